"""Contract suite run for every registered operator (docs/design.md, Contract: operator, and
Tests).

A new operator is tested here the moment it is registered. Per-operator equality with an
independent slow reference lives in test_op_<name>.py.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from raytopk.ops import get_op, get_spec, list_ops

OPS = list_ops()


def _params(name: str, value: float | None = None) -> dict[str, float]:
    spec = get_spec(name)
    return {spec.param: 1.0 if value is None else value}


def _separated(b: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Scores without ties: each row a random permutation of 0..n-1 (gaps >= 1), jittered."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n, generator=g) for _ in range(b)]
    x = torch.stack(rows).to(dtype)
    return x + 0.3 * torch.rand(b, n, generator=g, dtype=dtype)


def _hard_topk(x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact top-k mask over valid slots, by a full sort (k per row)."""
    out = torch.zeros_like(x)
    for r in range(x.shape[0]):
        valid = mask[r].nonzero().flatten()
        order = valid[torch.argsort(x[r, valid], descending=True)]
        out[r, order[: int(k[r])]] = 1.0
    return out


def test_registry_names_every_op() -> None:
    assert OPS == ["dftopk", "lapsum", "sparse_topk", "neuralsort", "softsort", "diffsort"]
    with pytest.raises(ValueError, match="unknown operator 'nope'.*dftopk"):
        get_op("nope")


# The RecFlow-protocol value of each operator's parameter (docs/protocol.md §2.5).
RECFLOW = {
    "dftopk": 500.0,
    "lapsum": 5.0,
    "sparse_topk": 1.0,
    "neuralsort": 50.0,
    "softsort": 50.0,
    "diffsort": 10.0,
}


@pytest.mark.parametrize("name", OPS)
def test_one_default_per_parameter(name: str) -> None:
    """The registry's default is the signature's, shared by every public function of the
    operator's module that takes the parameter; calling without it is the RecFlow operator."""
    spec = get_spec(name)
    assert spec.default == RECFLOW[name]
    module = importlib.import_module(spec.fn.__module__)
    takers = []
    for attr in module.__all__:
        fn = getattr(module, attr)
        if not inspect.isfunction(fn):
            continue
        param = inspect.signature(fn).parameters.get(spec.param)
        if param is not None:
            assert param.default == spec.default, f"{module.__name__}.{attr}"
            takers.append(attr)
    assert name in takers
    x = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    op = get_op(name)
    torch.testing.assert_close(op(x, 4), op(x, 4, **{spec.param: spec.default}), atol=0, rtol=0)
    from raytopk.losses.joint import resolve_op_params

    assert resolve_op_params(name, None) == {spec.param: spec.default}


@pytest.mark.parametrize("name", OPS)
def test_shape_bounds_and_sum(name: str) -> None:
    spec = get_spec(name)
    x = 3 * torch.randn(4, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k in (1, 4, 14):
        p = get_op(name)(x, k, **_params(name))
        assert p.shape == x.shape and p.dtype == x.dtype
        assert torch.isfinite(p).all()
        assert (p >= 0).all() and (p <= 1).all()
        if spec.sums_to_k:
            torch.testing.assert_close(p.sum(-1), torch.full((4,), float(k), dtype=x.dtype))


@pytest.mark.parametrize("name", OPS)
def test_hard_limit_gives_exact_topk(name: str) -> None:
    spec = get_spec(name)
    x = _separated(5, 12, seed=1)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, [0, 5, 7]] = False
    mask[3, 2:9] = False
    k = torch.tensor([3, 1, 6, 2, 11])
    p = get_op(name)(x, k, mask, **{spec.param: spec.hard_limit})
    torch.testing.assert_close(p, _hard_topk(x, k, mask), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", OPS)
def test_masked_slots_are_zero_and_absent(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(6, 11, dtype=torch.float64, generator=g)
    mask = torch.rand(6, 11, generator=g) > 0.35
    mask[:, 0] = True
    k = torch.tensor([1, 2, 3, 4, 2, 3])
    op = get_op(name)
    p = op(x, k, mask, **_params(name))
    assert (p[~mask] == 0).all()
    # Garbage (huge values, NaN) in masked slots changes nothing.
    y = x.clone()
    y[~mask] = 1e6
    y[~mask & (torch.arange(11) % 2 == 0)] = float("nan")
    torch.testing.assert_close(op(y, k, mask, **_params(name)), p, atol=1e-12, rtol=0)
    # Each row equals the op on its valid slots alone.
    for r in range(x.shape[0]):
        alone = op(x[r, mask[r]].unsqueeze(0), int(k[r]), **_params(name))[0]
        torch.testing.assert_close(p[r, mask[r]], alone, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("name", OPS)
def test_masked_slots_get_no_gradient(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(3, 9, dtype=torch.float64, generator=g)).requires_grad_()
    mask = torch.rand(3, 9, generator=g) > 0.3
    mask[:, :2] = True
    p = get_op(name)(x, 2, mask, **_params(name))
    (p * torch.randn(3, 9, dtype=torch.float64, generator=g)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", OPS)
def test_k_at_least_valid_selects_all(name: str) -> None:
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False  # 5 valid
    mask[2, 1:] = False  # 1 valid
    k = torch.tensor([5, 9, 3])
    p = get_op(name)(x, k, mask, **_params(name))
    torch.testing.assert_close(p[0, :5], torch.ones(5, dtype=x.dtype))
    torch.testing.assert_close(p[1], torch.ones(8, dtype=x.dtype))
    torch.testing.assert_close(p[2, :1], torch.ones(1, dtype=x.dtype))
    assert (p[~mask] == 0).all()


@pytest.mark.parametrize("name", OPS)
def test_per_row_k_equals_separate_calls(name: str) -> None:
    x = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    k = torch.tensor([1, 3, 5, 9])
    op = get_op(name)
    p = op(x, k, **_params(name))
    for r in range(4):
        torch.testing.assert_close(p[r], op(x[r : r + 1], int(k[r]), **_params(name))[0])


@pytest.mark.parametrize("name", OPS)
def test_batch_dims_are_flattened_consistently(name: str) -> None:
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    k = torch.tensor([[1, 2, 3], [4, 5, 6]])
    op = get_op(name)
    p = op(x, k, **_params(name))
    flat = op(x.reshape(6, 7), k.reshape(6), **_params(name))
    torch.testing.assert_close(p.reshape(6, 7), flat)


@pytest.mark.parametrize("name", OPS)
def test_gradcheck_float64(name: str) -> None:
    x = _separated(3, 7, seed=7) * 0.7
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, [2, 4]] = False
    k = torch.tensor([2, 3, 1])
    op = get_op(name)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: op(s, k, mask, **_params(name)), (x,))
    assert torch.autograd.gradcheck(lambda s: op(s, 3, **_params(name)), (x,))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(name: str, dtype: torch.dtype) -> None:
    x64 = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    op = get_op(name)
    x = x64.to(dtype).requires_grad_()
    p = op(x, 4, **_params(name))
    assert p.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    # Compare on the same rounded inputs, so only the op's own precision is measured.
    ref = op(x.detach().to(torch.float64), 4, **_params(name))
    torch.testing.assert_close(p.to(torch.float64), ref, atol=tol, rtol=0)
    p.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("name", OPS)
def test_bad_input_errors_name_the_argument(name: str) -> None:
    op = get_op(name)
    x = torch.randn(3, 5)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores.*nan.*row 1"):
        op(bad, 2)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"scores.*inf.*row 1"):
        op(bad, 2)
    with pytest.raises(ValueError, match=r"'k' should be >= 1 but got 0"):
        op(x, 0)
    with pytest.raises(ValueError, match=r"'k'.*-1"):
        op(x, torch.tensor([1, -1, 2]))
    with pytest.raises(ValueError, match=r"'k' should have shape.*\(3,\).*\(2,\)"):
        op(x, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"'k'.*float"):
        op(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match=r"'k'.*float"):
        op(x, 2.0)
    with pytest.raises(ValueError, match=r"'mask'.*shape"):
        op(x, 2, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"'mask'.*bool"):
        op(x, 2, torch.ones(3, 5))
    with pytest.raises(TypeError, match=r"'scores'.*floating-point.*int64"):
        op(torch.arange(10).reshape(2, 5), 2)
    with pytest.raises(ValueError, match=r"'scores'.*N >= 1"):
        op(torch.zeros(3, 0), 1)
    with pytest.raises(TypeError, match=r"'scores'.*Tensor"):
        op([1.0, 2.0], 1)
    spec = get_spec(name)
    with pytest.raises(ValueError, match=rf"'{spec.param}'.*> 0.*-1"):
        op(x, 2, **{spec.param: -1.0})
