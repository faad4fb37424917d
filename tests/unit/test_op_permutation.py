"""Permutation relaxations (neuralsort, softsort, diffsort) against slow independent references.

The references below are written from docs/protocol.md §2.4 with explicit Python loops over ranks,
items, layers and comparators on Python floats — no tensor code is shared with the operators.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from raytopk.ops import diffsort, get_op, get_spec, neuralsort, softsort

MODULES = {"neuralsort": neuralsort, "softsort": softsort, "diffsort": diffsort}
NAMES = list(MODULES)
# Moderate relaxation strengths: far from hard, so the comparison exercises the soft values.
SOFT = {"neuralsort": 0.7, "softsort": 0.7, "diffsort": 2.0}
F64 = torch.float64


# ---------------------------------------------------------------- slow references (valid only)
def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    s = sum(e)
    return [v / s for v in e]


def ref_neuralsort(xs: list[float], tau: float) -> list[list[float]]:
    n = len(xs)
    a = [sum(abs(xs[j] - xs[l]) for l in range(n)) for j in range(n)]
    out = []
    for r in range(1, n + 1):
        out.append(_softmax([((n + 1 - 2 * r) * xs[j] - a[j]) / tau for j in range(n)]))
    return out


def ref_softsort(xs: list[float], tau: float) -> list[list[float]]:
    n = len(xs)
    xhat = sorted(xs, reverse=True)
    return [_softmax([-abs(xhat[r] - xs[j]) / tau for j in range(n)]) for r in range(n)]


def ref_diffsort(xs: list[float], beta: float) -> list[list[float]]:
    n = len(xs)
    v = list(xs)
    p = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]  # wires x items
    for layer in range(n):
        for a in range(layer % 2, n - 1, 2):
            b = a + 1
            alpha = 0.5 + math.atan(beta * (v[b] - v[a])) / math.pi  # swap probability
            va, vb = v[a], v[b]
            v[a], v[b] = (1 - alpha) * va + alpha * vb, alpha * va + (1 - alpha) * vb
            pa, pb = p[a], p[b]
            p[a] = [(1 - alpha) * s + alpha * t for s, t in zip(pa, pb)]
            p[b] = [alpha * s + (1 - alpha) * t for s, t in zip(pa, pb)]
    return p


REFS: dict[str, Callable[[list[float], float], list[list[float]]]] = {
    "neuralsort": ref_neuralsort,
    "softsort": ref_softsort,
    "diffsort": ref_diffsort,
}


def ref_perm_row(name: str, x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """(N, N) reference for one row: the valid-only relaxation placed at the valid columns."""
    size = x.shape[-1]
    cols = [j for j in range(size) if bool(mask[j])]
    small = REFS[name]([float(x[j]) for j in cols], value)
    out = torch.zeros(size, size, dtype=F64)
    for r in range(len(cols)):
        for c, j in enumerate(cols):
            out[r, j] = small[r][c]
    return out


def ref_membership_row(perm: torch.Tensor, k: int, mask: torch.Tensor) -> torch.Tensor:
    size = perm.shape[-1]
    n = int(mask.sum())
    out = torch.zeros(size, dtype=F64)
    for j in range(size):
        if not bool(mask[j]):
            continue
        if k >= n:
            out[j] = 1.0
            continue
        top = sum(float(perm[r, j]) for r in range(k))
        total = sum(float(perm[r, j]) for r in range(size))
        out[j] = top / total
    return out


# ---------------------------------------------------------------- inputs
def _scores(b: int, n: int, seed: int) -> torch.Tensor:
    return 2.0 * torch.randn(b, n, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _mask(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=g) > 0.35
    mask[0] = True  # a full row
    mask[1] = False
    mask[1, 3] = True  # a single valid slot
    mask[2, 0] = True
    mask[2, -1] = False
    return mask


def _separated(b: int, n: int, seed: int) -> torch.Tensor:
    """Each row a random permutation of 0..n-1 (gaps exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).to(F64)


def _hard_perm(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact sorting permutation (ranks descending x items), ranks >= n zero."""
    b, n = x.shape
    out = torch.zeros(b, n, n, dtype=F64)
    for i in range(b):
        cols = [j for j in range(n) if bool(mask[i, j])]
        order = sorted(cols, key=lambda j: -float(x[i, j]))
        for r, j in enumerate(order):
            out[i, r, j] = 1.0
    return out


# ---------------------------------------------------------------- tests
def test_registry_metadata() -> None:
    expected = {
        "neuralsort": ("tau", 50.0, 1e-3),
        "softsort": ("tau", 50.0, 1e-3),
        "diffsort": ("steepness", 10.0, 1e5),
    }
    for name, (param, default, hard) in expected.items():
        spec = get_spec(name)
        assert (spec.param, spec.default, spec.hard_limit) == (param, default, hard)
        assert spec.permutation and not spec.sums_to_k
        assert spec.fn is getattr(MODULES[name], name)


@pytest.mark.parametrize("name", NAMES)
def test_soft_permutation_matches_reference(name: str) -> None:
    x = _scores(5, 9, seed=10)
    mask = _mask(5, 9, seed=11)
    value = SOFT[name]
    perm = MODULES[name].soft_permutation(x, value, mask)
    assert perm.shape == (5, 9, 9) and perm.dtype == F64
    for i in range(5):
        torch.testing.assert_close(perm[i], ref_perm_row(name, x[i], mask[i], value), atol=1e-10,
                                   rtol=1e-7)
    full = MODULES[name].soft_permutation(x, value)  # mask=None: every slot valid
    ones = torch.ones(9, dtype=torch.bool)
    for i in range(5):
        torch.testing.assert_close(full[i], ref_perm_row(name, x[i], ones, value), atol=1e-10,
                                   rtol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_membership_matches_reference_with_per_row_k(name: str) -> None:
    x = _scores(5, 9, seed=12)
    mask = _mask(5, 9, seed=13)
    k = torch.tensor([3, 1, 5, 2, 9])  # row 1 has one valid slot: k >= n there
    value = SOFT[name]
    u = get_op(name)(x, k, mask, **{get_spec(name).param: value})
    assert u.shape == x.shape and u.dtype == F64
    for i in range(5):
        ref = ref_membership_row(ref_perm_row(name, x[i], mask[i], value), int(k[i]), mask[i])
        torch.testing.assert_close(u[i], ref, atol=1e-10, rtol=1e-7)
    # An int k equals the same k given per row.
    u_int = get_op(name)(x, 2, mask, **{get_spec(name).param: value})
    u_rows = get_op(name)(x, torch.full((5,), 2), mask, **{get_spec(name).param: value})
    torch.testing.assert_close(u_int, u_rows, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_row_and_column_sums(name: str) -> None:
    x = _scores(6, 10, seed=14)
    mask = _mask(6, 10, seed=15)
    perm = MODULES[name].soft_permutation(x, SOFT[name], mask)
    n = mask.sum(-1)
    ranks = torch.arange(10) < n.unsqueeze(-1)  # (6, 10)
    # Every method's rows are distributions over the valid items; past rank n they are empty.
    torch.testing.assert_close(perm.sum(-1), ranks.to(F64))
    assert (perm >= 0).all()
    assert (perm[~mask.unsqueeze(-2).expand_as(perm)] == 0).all()
    assert (perm[~ranks.unsqueeze(-1).expand_as(perm)] == 0).all()
    if name == "diffsort":  # doubly stochastic: every comparator mixes two rows convexly
        torch.testing.assert_close(perm.sum(-2), mask.to(F64))
    else:  # row-stochastic only; with these soft values the columns visibly do not sum to 1
        assert (perm.sum(-2)[mask] - 1).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_mask_equals_valid_only_call(name: str) -> None:
    module = MODULES[name]
    param = get_spec(name).param
    x = _scores(6, 11, seed=16)
    mask = _mask(6, 11, seed=17)
    k = torch.tensor([4, 1, 3, 2, 5, 1])
    value = SOFT[name]
    perm = module.soft_permutation(x, value, mask)
    u = get_op(name)(x, k, mask, **{param: value})
    # Garbage in the padding (inf, NaN) changes nothing.
    y = x.clone()
    y[~mask] = float("inf")
    y[~mask & (torch.arange(11) % 2 == 0)] = float("nan")
    torch.testing.assert_close(module.soft_permutation(y, value, mask), perm, atol=0, rtol=0)
    torch.testing.assert_close(get_op(name)(y, k, mask, **{param: value}), u, atol=0, rtol=0)
    for i in range(6):
        cols = mask[i].nonzero().flatten()
        n = cols.numel()
        alone = module.soft_permutation(x[i, cols].unsqueeze(0), value)[0]  # (n, n)
        torch.testing.assert_close(perm[i][:n][:, cols], alone, atol=1e-12, rtol=1e-10)
        u_alone = get_op(name)(x[i, cols].unsqueeze(0), int(k[i]), **{param: value})[0]
        torch.testing.assert_close(u[i, cols], u_alone, atol=1e-12, rtol=1e-10)
        assert (u[i, ~mask[i]] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name: str) -> None:
    module = MODULES[name]
    param = get_spec(name).param
    x = (0.6 * _separated(3, 6, seed=18) + 0.1 * _scores(3, 6, seed=19)).requires_grad_()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, [1, 4]] = False
    mask[2, 5] = False
    k = torch.tensor([2, 3, 1])
    value = SOFT[name]
    w = torch.randn(3, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(20))
    assert torch.autograd.gradcheck(
        lambda s: (module.soft_permutation(s, value, mask) * w).sum(), (x,)
    )
    assert torch.autograd.gradcheck(lambda s: module.soft_permutation(s, value), (x,))
    assert torch.autograd.gradcheck(lambda s: get_op(name)(s, k, mask, **{param: value}), (x,))


@pytest.mark.parametrize("name", NAMES)
def test_padding_gets_zero_finite_gradient(name: str) -> None:
    module = MODULES[name]
    x = _scores(3, 8, seed=21)
    mask = _mask(3, 8, seed=22)
    x[~mask] = float("nan")
    x[2, ~mask[2]] = float("inf")
    x.requires_grad_()
    w = torch.randn(3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(23))
    (module.soft_permutation(x, SOFT[name], mask) * w).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
    assert (x.grad[mask] != 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_hard_limit_gives_the_permutation_matrix(name: str) -> None:
    spec = get_spec(name)
    x = _separated(4, 16, seed=24)  # gaps >= 1, N = 16
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[1, [0, 3, 9]] = False
    mask[3, 5:] = False
    hard = _hard_perm(x, mask)
    perm = MODULES[name].soft_permutation(x, spec.hard_limit, mask)
    torch.testing.assert_close(perm, hard, atol=1e-3, rtol=0)
    k = torch.tensor([5, 1, 15, 3])
    u = spec.fn(x, k, mask, **{spec.param: spec.hard_limit})
    expected = torch.stack([hard[i, : int(k[i])].sum(0) for i in range(4)])
    torch.testing.assert_close(u, expected, atol=1e-3, rtol=0)
    # float32 reaches the same hard limit.
    perm32 = MODULES[name].soft_permutation(x.float(), spec.hard_limit, mask)
    torch.testing.assert_close(perm32.double(), hard, atol=1e-3, rtol=0)


def test_diffsort_updates_wire_values() -> None:
    """A network whose comparators read the unsorted input (no wire update) cannot sort a
    reversed row; the real network does, so the top wire ends on the largest item."""
    x = torch.arange(8, dtype=F64).unsqueeze(0)  # ascending: the largest is at the bottom
    perm = diffsort.soft_permutation(x, 1e5)
    torch.testing.assert_close(perm[0], torch.eye(8, dtype=F64).flip(-1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_dtypes_and_shapes(name: str) -> None:
    module = MODULES[name]
    param = get_spec(name).param
    x = _scores(2, 3 * 5, seed=25).reshape(2, 3, 5)
    mask = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(26)) > 0.3
    ref = module.soft_permutation(x, 1.5, mask)
    assert ref.shape == (2, 3, 5, 5)
    torch.testing.assert_close(module.soft_permutation(x.reshape(6, 5), 1.5, mask.reshape(6, 5)),
                               ref.reshape(6, 5, 5))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        xd = x.to(dtype)
        perm = module.soft_permutation(xd, 1.5, mask)
        assert perm.dtype == dtype
        exact = module.soft_permutation(xd.to(F64), 1.5, mask)  # same rounded inputs
        torch.testing.assert_close(perm.to(F64), exact, atol=tol, rtol=0)
        u = get_op(name)(xd, 2, mask, **{param: 1.5})
        assert u.dtype == dtype and u.shape == x.shape
    # An empty batch and a single candidate are legal.
    assert module.soft_permutation(torch.zeros(0, 4, dtype=F64), 1.0).shape == (0, 4, 4)
    torch.testing.assert_close(module.soft_permutation(torch.ones(3, 1, dtype=F64), 1.0),
                               torch.ones(3, 1, 1, dtype=F64))


@pytest.mark.parametrize("name", NAMES)
def test_soft_permutation_errors_name_the_argument(name: str) -> None:
    module = MODULES[name]
    param = get_spec(name).param
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=rf"'{param}'.*> 0.*-2"):
        module.soft_permutation(x, -2.0)
    with pytest.raises(TypeError, match=rf"'{param}'.*number.*str"):
        module.soft_permutation(x, "1")
    with pytest.raises(ValueError, match=r"'mask'.*shape.*\(2, 3\)"):
        module.soft_permutation(x, 1.0, torch.ones(2, 3, dtype=torch.bool))
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'scores'.*nan.*row 1"):
        module.soft_permutation(bad, 1.0)
    with pytest.raises(TypeError, match=r"'scores'.*floating-point"):
        module.soft_permutation(torch.arange(4).reshape(1, 4), 1.0)
