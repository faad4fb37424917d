"""The operator contract in bfloat16, for every operator whose registry entry declares ``bf16``
(with its reason): what a mixed-precision caller may hand it (``optim.amp``, raytopk.train.model
casts scores to float32 before the loss, but an operator that declares bf16 must also be right
when called on bf16 scores directly). On CPU; jobs/gpu_check.py checks device parity.

Tolerances: bf16 keeps 8 significant bits, so a membership in [0, 1] is rounded by at most
2^-9 ≈ 0.002 on output and its inputs by a relative 2^-9; every comparison is against float64 on
the same rounded inputs, so only the operator's own precision is measured.
"""

from __future__ import annotations

import pytest
import torch

from raytopk.ops import get_op, get_spec, list_ops

BF16_OPS = [name for name in list_ops() if get_spec(name).bf16]
OUT_TOL = 8e-3  # membership (output rounding 2^-9 plus float32 compute)
GRAD_RTOL = 2e-2  # gradients, relative to the row's largest float64 gradient


def _params(name: str) -> dict[str, float]:
    return {get_spec(name).param: 1.0}


def _rounded(b: int, n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """bf16 scores, and nothing lost when they are widened to float64 for the reference."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, n, generator=g, dtype=torch.float64)).to(torch.bfloat16)


def test_every_op_declares_bf16_with_a_reason() -> None:
    for name in list_ops():
        spec = get_spec(name)
        assert isinstance(spec.bf16, bool), name
        assert len(spec.bf16_reason) > 20, f"{name}: say why bf16 is (not) supported"
    assert "dftopk" in BF16_OPS  # the operator mixed-precision training relies on


@pytest.mark.parametrize("name", BF16_OPS)
@pytest.mark.parametrize("n", [15, 40])
def test_bf16_forward_backward_match_float64(name: str, n: int) -> None:
    op, k = get_op(name), 4
    x = _rounded(4, n, seed=n).requires_grad_()
    mask = torch.rand(4, n, generator=torch.Generator().manual_seed(1)) > 0.2
    mask[:, :k + 1] = True
    w = torch.randn(4, n, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    p = op(x, k, mask, **_params(name))
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    assert (p >= 0).all() and (p <= 1).all() and (p[~mask] == 0).all()
    (p * w).sum().backward()

    x64 = x.detach().double().requires_grad_()
    ref = op(x64, k, mask, **_params(name))
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(p.double(), ref.detach(), atol=OUT_TOL, rtol=0)
    scale = x64.grad.abs().amax(-1, keepdim=True).clamp_min(1e-6)  # (B, 1)
    torch.testing.assert_close(
        x.grad.double() / scale, x64.grad / scale, atol=GRAD_RTOL, rtol=0
    )
    assert (x.grad[~mask] == 0).all()
    if get_spec(name).sums_to_k:
        total = p.double().sum(-1)  # each of the N outputs rounded by <= 2^-9
        torch.testing.assert_close(total, torch.full_like(total, k), atol=n * 2**-9, rtol=0)


@pytest.mark.parametrize("name", BF16_OPS)
def test_bf16_hard_limit_and_per_row_k(name: str) -> None:
    """Integer-spaced scores are exact in bf16; the hard limit gives the top-k mask (within the
    output rounding), per row k and k >= #valid included."""
    spec = get_spec(name)
    g = torch.Generator().manual_seed(3)
    x = torch.stack([torch.randperm(12, generator=g) for _ in range(5)]).to(torch.bfloat16)
    mask = torch.ones(5, 12, dtype=torch.bool)
    mask[1, [0, 5, 7]] = False
    mask[3, 2:9] = False
    k = torch.tensor([3, 1, 6, 2, 12])
    p = get_op(name)(x, k, mask, **{spec.param: spec.hard_limit})
    ref = get_op(name)(x.double(), k, mask, **{spec.param: spec.hard_limit})
    assert p.dtype == torch.bfloat16
    hard = (ref > 0.5).double()
    assert (hard.sum(-1) == torch.minimum(k, mask.sum(-1)).double()).all()
    torch.testing.assert_close(p.double(), hard, atol=5e-3, rtol=0)
