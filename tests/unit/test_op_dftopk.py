"""DFTopK against an independent slow reference (full sort, explicit loops), every selection
primitive, the sampled long-row path, and torch.compile."""

from __future__ import annotations

import pytest
import torch

from raytopk.ops.dftopk import dftopk, dftopk_logits, dftopk_threshold

SELECTS = ("numba", "topk", "sort", "topk_unsorted")  # per-row k: topk_unsorted falls back


def _ref_logits(x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """z by a full sort per row and explicit loops, differentiable through sort's values."""
    rows = []
    for r in range(x.shape[0]):
        valid = mask[r].nonzero().flatten().tolist()
        kr = int(k[r])
        z = torch.full_like(x[r], float("-inf"))
        if kr >= len(valid):
            for j in valid:
                z[j] = float("inf")
        else:
            s = torch.sort(x[r, valid], descending=True).values
            theta = (s[kr - 1] + s[kr]) / 2
            for j in valid:
                z[j] = (x[r, j] - theta) / tau
        rows.append(z)
    return torch.stack(rows)


def _case(b: int, n: int, seed: int, masked: bool, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, generator=g, dtype=torch.float64)
    if ties:
        x = (2 * x).round()
    mask = torch.rand(b, n, generator=g) > (0.4 if masked else -1.0)
    k = torch.randint(1, n + 2, (b,), generator=g)
    return x, k, mask


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("n", [1, 2, 7, 40, 200])
@pytest.mark.parametrize("masked", [False, True])
def test_logits_equal_reference(select: str, n: int, masked: bool) -> None:
    x, k, mask = _case(6, n, seed=n, masked=masked)
    z = dftopk_logits(x, k, tau=0.7, mask=mask, select=select)
    torch.testing.assert_close(z, _ref_logits(x, k, mask, 0.7), atol=1e-12, rtol=0)


@pytest.mark.parametrize("select", SELECTS)
def test_gradient_equals_autograd_through_sort(select: str) -> None:
    # Without ties, autograd through sort routes ∂θ to exactly the two boundary slots: the
    # localized closed form of docs/protocol.md §2.1.
    x, k, mask = _case(5, 30, seed=3, masked=True)
    w = torch.randn(5, 30, dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    keep = mask & (k.unsqueeze(-1) < mask.sum(-1, keepdim=True))
    (torch.sigmoid(dftopk_logits(a, k, 1.3, mask, select=select)) * w)[keep].sum().backward()
    (torch.sigmoid(_ref_logits(b, k, mask, 1.3)) * w)[keep].sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


def test_localized_gradient_structure() -> None:
    x = torch.tensor([[4.0, 1.0, 3.0, 0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    dftopk_logits(x, 2, tau=2.0).backward(g)
    # θ = (x_[2] + x_[3]) / 2 = (3 + 2) / 2: slots 2 and 4 absorb −½Σg/τ = −3.75 each.
    expected = g / 2.0
    expected[0, 2] -= 3.75
    expected[0, 4] -= 3.75
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("select", SELECTS)
def test_ties_at_the_boundary_give_one_half(select: str) -> None:
    x = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]], dtype=torch.float64)
    p = dftopk(x, 2, tau=0.01, select=select)
    torch.testing.assert_close(p[0, 1:4], torch.full((3,), 0.5, dtype=x.dtype))
    assert p[0, 0] > 0.999 and p[0, 4] < 1e-3


@pytest.mark.parametrize("masked", [False, True])
def test_long_rows_sampled_path_matches_sort(masked: bool) -> None:
    # Rows >= 4096 valid slots go through the sampled filter; sorted and tied inputs too.
    g = torch.Generator().manual_seed(11)
    n = 9000
    x = torch.randn(6, n, generator=g, dtype=torch.float64)
    x[1] = x[1].sort().values  # ascending input
    x[2] = (x[2] * 3).round()  # heavy ties
    x[3] = x[3].sort(descending=True).values
    mask = torch.rand(6, n, generator=g) > (0.3 if masked else -1.0)
    k = torch.tensor([1, 10, 100, 4000, 5000, 4500])
    for select in SELECTS:
        z = dftopk_logits(x, k, tau=1.0, mask=mask, select=select)
        torch.testing.assert_close(z, _ref_logits(x, k, mask, 1.0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("select", ["kthvalue", "topk_unsorted"])
def test_uniform_k_selects(select: str) -> None:
    x, _, mask = _case(7, 50, seed=5, masked=True)
    for k in (1, 5, 20):
        kk = torch.full((7,), k)
        z = dftopk_logits(x, k, tau=1.0, mask=mask, select=select)
        torch.testing.assert_close(z, _ref_logits(x, kk, mask, 1.0), atol=1e-12, rtol=0)


def test_threshold_matches_sort() -> None:
    x, k, mask = _case(4, 25, seed=9, masked=True)
    theta = dftopk_threshold(x, k, mask)
    for r in range(4):
        s = x[r, mask[r]].sort(descending=True).values
        kr = int(k[r])
        want = float("-inf") if kr >= s.numel() else float((s[kr - 1] + s[kr]) / 2)
        assert float(theta[r]) == want


def test_bad_select_is_named() -> None:
    with pytest.raises(ValueError, match="'select'"):
        dftopk(torch.randn(2, 5), 2, select="heap")


def test_float32_and_bf16_inputs() -> None:
    x = torch.randn(8, 40)
    p32 = dftopk(x, 10, tau=0.5)
    assert p32.dtype == torch.float32
    pb = dftopk(x.bfloat16(), 10, tau=0.5)
    assert pb.dtype == torch.bfloat16
    z = dftopk_logits(x.bfloat16(), 10, tau=0.5)
    assert z.dtype == torch.float32  # logits are formed in float32 for 16-bit inputs


def test_torch_compile_matches_eager() -> None:
    x, k, mask = _case(4, 32, seed=21, masked=True)
    x = x.float()
    y = (torch.rand(4, 32, generator=torch.Generator().manual_seed(1)) > 0.7).float()

    def loss(s: torch.Tensor) -> torch.Tensor:
        z = dftopk_logits(s * 2.0, k, 0.5, mask)
        z = torch.where(mask & (k.unsqueeze(-1) < mask.sum(-1, keepdim=True)), z, 0.0)
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y)

    compiled = torch.compile(
        loss,
        fullgraph=False,
    )
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = loss(a)
    lb = compiled(b)
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la)
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("n", [30, 6000])  # the copy path and the sampled long-row path
def test_non_finite_valid_scores_name_the_row(select: str, n: int) -> None:
    x = torch.randn(3, n, dtype=torch.float64)
    mask = torch.ones(3, n, dtype=torch.bool)
    x[0, 3] = float("nan")
    mask[0, 3] = False  # padding may hold anything
    for row, k, bad in ((1, 5, float("nan")), (2, n, float("inf"))):  # k >= n rows too
        y = x.clone()
        y[row, 7] = bad
        with pytest.raises(ValueError, match=rf"'scores' has a non-finite value .* row {row}"):
            dftopk_logits(y, k, 1.0, mask, select=select)
    dftopk_logits(x, 5, 1.0, mask, select=select)  # masked NaN alone is fine


# ---- gradients with ties, on every selection path -----------------------------------------------

ALL_SELECTS = ("auto", "numba", "topk", "topk_unsorted", "kthvalue", "sort")


def _assert_closed_form_grad(x, k, mask, tau, g, grad) -> None:
    """grad = g/τ at valid slots, plus −½Σg/τ at two DISTINCT slots π(k), π(k+1) holding
    x_[k] and x_[k+1] (docs/protocol.md §2.1; at a tie any two distinct tied slots); 0 at masked
    slots and in rows with k >= n."""
    for r in range(x.shape[0]):
        valid = mask[r].nonzero().flatten().tolist()
        kr = int(k[r])
        assert (grad[r, ~mask[r]] == 0).all()
        if kr >= len(valid):
            assert (grad[r] == 0).all()
            continue
        s = torch.sort(x[r, valid], descending=True).values
        hi, lo = float(s[kr - 1]), float(s[kr])
        gv = g[r, valid] / tau
        half = -0.5 * float(gv.sum())
        resid = grad[r, valid] - gv
        moved = (resid.abs() > 1e-9).nonzero().flatten().tolist()
        assert len(moved) == 2, (r, resid)  # two distinct boundary slots, not one twice
        torch.testing.assert_close(resid[moved], torch.full((2,), half, dtype=x.dtype))
        got = sorted(float(x[r, valid[i]]) for i in moved)
        assert got == sorted([hi, lo]), (r, got, hi, lo)


@pytest.mark.parametrize("select", ALL_SELECTS)
def test_gradient_at_a_boundary_tie_uses_two_slots(select: str) -> None:
    x = torch.tensor([[3.0, 2.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    dftopk_logits(x, 2, tau=1.0, select=select).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=x.dtype))


@pytest.mark.parametrize("select", ALL_SELECTS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_with_ties_matches_closed_form(select: str, k: int, masked: bool) -> None:
    # Integer scores in [-3, 3]: ties at the k/k+1 boundary and elsewhere in most rows. One k
    # for every row, so select="kthvalue" runs its own path (per-row k falls back to topk).
    x, _, mask = _case(12, 10, seed=100 + k, masked=masked, ties=True)
    x[0] = torch.tensor([5.0, 5.0, 3.0, 2.0, 2.0, 0.0, 0.0, 0.0, -1.0, -1.0])
    mask[0] = True
    g = torch.rand(12, 10, generator=torch.Generator().manual_seed(k), dtype=x.dtype) + 0.5
    xg = x.clone().requires_grad_()
    dftopk_logits(xg, k, tau=0.7, mask=mask, select=select).backward(g)
    _assert_closed_form_grad(x, torch.full((12,), k), mask, 0.7, g, xg.grad)


@pytest.mark.parametrize("select", ALL_SELECTS)
def test_gradient_with_ties_long_rows(select: str) -> None:
    # >= 4096 valid slots: the numba kernel's sampled path; heavy ties everywhere.
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(3, 5000, generator=g, dtype=torch.float64) * 3).round()
    mask = torch.rand(3, 5000, generator=g) > 0.1
    up = torch.rand(3, 5000, generator=g, dtype=torch.float64) + 0.5
    for k in (1, 100, 2000):
        xg = x.clone().requires_grad_()
        dftopk_logits(xg, k, tau=2.0, mask=mask, select=select).backward(up)
        _assert_closed_form_grad(x, torch.full((3,), k), mask, 2.0, up, xg.grad)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [1, 2, 10, 15, 16, 40, 195, 199])
def test_numba_boundary_slots_are_the_first_holding_the_values(k: int, masked: bool) -> None:
    # The CPU kernel's paths (one-pass insertion for k + 1 <= 16, quickselect, its mirror for
    # n − k + 1 <= 16, the sampled filter for long rows) all name the same slots: π(k) the first
    # valid slot holding x_[k], π(k+1) the first holding x_[k+1] (the first two when they are
    # equal). Which tied slot absorbs the boundary gradient then never depends on the path, so
    # a faster path cannot change a training run's numbers.
    from raytopk.ops._dftopk_cpu import threshold_numba

    g = torch.Generator().manual_seed(1000 + k)
    for n, scale in ((200, 1.0), (200, 0.0), (5000, 1.0)):
        if k >= n:
            continue
        x = torch.randn(9, n, generator=g, dtype=torch.float32)
        x = (x * 3).round() if scale == 1.0 else x  # heavy ties / distinct values
        mask = torch.rand(9, n, generator=g) > 0.2 if masked else torch.ones(9, n, dtype=torch.bool)
        mask[:, : k + 1] = True  # every row keeps more than k valid slots
        idx = threshold_numba(x, torch.full((9,), k), mask if masked else None)[1]
        for r in range(9):
            valid = mask[r].nonzero().flatten().tolist()
            s = torch.sort(x[r, valid], descending=True).values
            hi, lo = float(s[k - 1]), float(s[k])
            holding_hi = [j for j in valid if float(x[r, j]) == hi]
            holding_lo = [j for j in valid if float(x[r, j]) == lo]
            want = holding_hi[:2] if hi == lo else [holding_hi[0], holding_lo[0]]
            assert idx[r].tolist() == want, (n, r, idx[r].tolist(), want)
