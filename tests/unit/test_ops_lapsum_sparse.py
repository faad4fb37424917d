"""LapSum and sparse top-k against slow, independent references written here
(docs/design.md, Tests).

LapSum: b by 200 bisection steps on Σ F(x/α − b) = k; gradients against autograd through the
reference with b made differentiable by implicit differentiation (one Newton step at the root),
and against central finite differences of the bisection reference.
Sparse top-k: isotonic regression by the O(N³) min-max formula
v_i = min_{a≤i} max_{b≥i} mean(y[a..b]) (non-increasing fit), and the projection property checked
directly on every vertex of the permutahedron; gradients against finite differences.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from raytopk.ops.lapsum import lapsum, lapsum_threshold
from raytopk.ops.sparse_topk import sparse_topk

F64 = torch.float64


# ---- LapSum reference ----------------------------------------------------------------------


def _laplace_cdf(t: torch.Tensor) -> torch.Tensor:
    return torch.where(
        t <= 0, 0.5 * torch.exp(torch.clamp(t, max=0)), 1 - 0.5 * torch.exp(-torch.clamp(t, min=0))
    )


def _bisect_b(x: torch.Tensor, k: int, alpha: float, steps: int = 200) -> float:
    """b with Σ F(x/α − b) = k, by plain bisection (h is decreasing in b)."""
    s = x.detach().to(F64) / alpha
    n = s.numel()
    lo = float(s.min()) - np.log(n) - 5.0  # h(lo) > n − 1 >= k
    hi = float(s.max()) + np.log(n) + 5.0  # h(hi) < 1 <= k
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if float(_laplace_cdf(s - mid).sum()) > k:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _lapsum_ref(x: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """p(x) for one row (float64, differentiable): b from bisection, then one Newton step whose
    autograd graph carries the implicit derivative ∂b/∂x = −(∂h/∂x)/(∂h/∂b) at the root."""
    if k >= x.numel():
        return torch.ones_like(x)
    b0 = _bisect_b(x, k, alpha)
    s = x / alpha
    h = _laplace_cdf(s - b0).sum()
    fsum = (0.5 * torch.exp(-(s - b0).abs())).sum().detach()  # = −∂h/∂b
    b = b0 + (h - k) / fsum
    return _laplace_cdf(s - b)


def _fd_jacobian(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences, J[i, j] = ∂fn(x)_i / ∂x_j."""
    cols = []
    for j in range(x.numel()):
        e = torch.zeros_like(x)
        e[j] = eps
        cols.append((fn(x + e) - fn(x - e)) / (2 * eps))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 5.0])
def test_lapsum_equals_bisection_reference(alpha: float) -> None:
    g = torch.Generator().manual_seed(10)
    x = 3 * torch.randn(5, 9, dtype=F64, generator=g)
    for k in (1, 2, 4, 8):
        p = lapsum(x, k, alpha=alpha)
        b = lapsum_threshold(x, k, alpha=alpha)
        for r in range(x.shape[0]):
            torch.testing.assert_close(p[r], _lapsum_ref(x[r], k, alpha), atol=1e-10, rtol=0)
            assert abs(float(b[r]) - _bisect_b(x[r], k, alpha)) < 1e-9
        torch.testing.assert_close(p.sum(-1), torch.full((5,), float(k), dtype=F64))


def test_lapsum_masked_and_per_row_k_equal_reference_on_valid_slots() -> None:
    g = torch.Generator().manual_seed(11)
    x = 4 * torch.randn(6, 12, dtype=F64, generator=g)
    mask = torch.rand(6, 12, generator=g) > 0.4
    mask[:, :3] = True
    mask[5] = False
    mask[5, 7] = True  # a single valid slot
    k = torch.tensor([1, 2, 3, 5, 30, 1])
    x[~mask] = float("nan")  # padding content must not matter
    p = lapsum(x, k, mask, alpha=2.0)
    assert (p[~mask] == 0).all()
    for r in range(6):
        ref = _lapsum_ref(x[r, mask[r]], int(k[r]), 2.0)
        torch.testing.assert_close(p[r, mask[r]], ref, atol=1e-10, rtol=0)
    assert (p[4, mask[4]] == 1).all() and (p[5, 7] == 1)


def test_lapsum_large_scores_stay_finite_and_exact() -> None:
    g = torch.Generator().manual_seed(12)
    x = 1e4 * torch.randn(4, 20, dtype=F64, generator=g)
    x[1] = 1e4 + 10 * torch.randn(20, dtype=F64, generator=g)  # large offset, small spread
    x[2, :5] = -1e4  # tied block at the bottom
    x = x.requires_grad_()
    for k in (1, 7, 19):
        p = lapsum(x, k, alpha=5.0)
        assert torch.isfinite(p).all()
        for r in range(4):
            torch.testing.assert_close(p[r], _lapsum_ref(x[r].detach(), k, 5.0), atol=1e-8, rtol=0)
        (grad,) = torch.autograd.grad((p * torch.arange(20, dtype=F64)).sum(), x)
        assert torch.isfinite(grad).all()
    # float32 at the same magnitude: finite, sums to k, close to the float64 result.
    p32 = lapsum(x.detach().float(), 7, alpha=5.0)
    assert torch.isfinite(p32).all()
    torch.testing.assert_close(p32.sum(-1), torch.full((4,), 7.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(p32.double(), lapsum(x.detach(), 7, alpha=5.0), atol=1e-3, rtol=0)


def test_lapsum_ties() -> None:
    # All equal: by symmetry p = k/n, whichever side of the breakpoints b falls (b < s_1 for
    # k > n/2, b > s_n for k < n/2, b = s for k = n/2).
    x = torch.full((1, 6), 2.5, dtype=F64)
    for k in range(1, 6):
        torch.testing.assert_close(lapsum(x, k), torch.full((1, 6), k / 6, dtype=F64))
    # Ties at the k / k+1 boundary and elsewhere.
    x = torch.tensor([[3.0, 1.0, 1.0, 0.0, 3.0, -2.0, 1.0]], dtype=F64)
    for k in (1, 2, 3, 4):
        p = lapsum(x, k, alpha=0.7)
        torch.testing.assert_close(p[0], _lapsum_ref(x[0], k, 0.7), atol=1e-10, rtol=0)
        assert p[0, 0] == p[0, 4] and p[0, 1] == p[0, 2] == p[0, 6]


@pytest.mark.parametrize("alpha", [0.5, 5.0])
def test_lapsum_gradient_equals_implicit_and_finite_difference_references(alpha: float) -> None:
    g = torch.Generator().manual_seed(13)
    x = 3 * torch.randn(3, 8, dtype=F64, generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, [1, 6]] = False
    k = torch.tensor([2, 3, 6])
    jac = torch.autograd.functional.jacobian(lambda s: lapsum(s, k, mask, alpha=alpha), x)
    for r in range(3):
        v = mask[r]
        j_op = jac[r, :, r, :][v][:, v]
        xr = x[r, v]
        kr = int(k[r])
        j_imp = torch.autograd.functional.jacobian(lambda s, kr=kr: _lapsum_ref(s, kr, alpha), xr)
        torch.testing.assert_close(j_op, j_imp, atol=1e-9, rtol=0)
        j_fd = _fd_jacobian(lambda s, kr=kr: _lapsum_ref(s, kr, alpha).detach(), xr)
        torch.testing.assert_close(j_op, j_fd, atol=1e-6, rtol=0)
        # Masked slots: no gradient in, no influence out; other rows untouched.
        assert (jac[r, :, r][:, ~v] == 0).all()
        assert (jac[r, ~v] == 0).all()
    assert (jac[0, :, 1] == 0).all() and (jac[2, :, 0] == 0).all()
    # Σ p = k is preserved: every column of the Jacobian sums to 0.
    torch.testing.assert_close(jac[0, :, 0].sum(0), torch.zeros(8, dtype=F64))


def test_lapsum_gradcheck_large_scores_and_all_selected_rows() -> None:
    g = torch.Generator().manual_seed(14)
    x = (1e4 * torch.rand(3, 6, dtype=F64, generator=g)).requires_grad_()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 2:] = False  # 2 valid, k = 3: all selected
    k = torch.tensor([2, 4, 3])
    assert torch.autograd.gradcheck(lambda s: lapsum(s, k, mask, alpha=5.0) * 1e3, (x,))
    p = lapsum(x, k, mask, alpha=5.0)
    (grad,) = torch.autograd.grad(p[2].sum() + p[0, 0], x)
    assert (grad[2] == 0).all()


def test_lapsum_cpu_kernel_equals_torch_path() -> None:
    # The CPU path (numba) and the path used on other devices (torch.searchsorted over
    # logcumsumexp) compute the same threshold; both are exercised here on CPU.
    from raytopk.ops.lapsum import _threshold, _threshold_torch

    g = torch.Generator().manual_seed(15)
    for scale in (1.0, 1e3):
        s = scale * torch.randn(40, 17, dtype=F64, generator=g)
        s[3] = 0.25  # all tied
        valid = torch.rand(40, 17, generator=g) > 0.3
        valid[:, 0] = True
        k = torch.randint(1, 18, (40,), generator=g)
        n = valid.sum(-1)
        b_cpu = _threshold(s, k, valid, n)
        b_torch = _threshold_torch(s, k, valid, n)
        live = k < n
        assert live.sum() > 20
        torch.testing.assert_close(b_cpu[live], b_torch[live], atol=1e-9 * scale, rtol=1e-12)


def test_lapsum_hard_limit_and_bfloat16() -> None:
    x = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]])
    torch.testing.assert_close(
        lapsum(x, 2, alpha=1e-3), torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]]), atol=1e-6, rtol=0
    )
    xb = x.to(torch.bfloat16).requires_grad_()
    p = lapsum(xb, 2, alpha=1.0)
    assert p.dtype == torch.bfloat16
    p.float().sum().backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16


# ---- sparse top-k reference ----------------------------------------------------------------


def _isotonic_dec_ref(y: np.ndarray) -> np.ndarray:
    """Non-increasing least-squares fit, v_i = min_{a≤i} max_{b≥i} mean(y[a..b]) (O(N³))."""
    n = len(y)
    v = np.empty(n)
    for i in range(n):
        v[i] = min(max(y[a : b + 1].mean() for b in range(i, n)) for a in range(i + 1))
    return v


def _sparse_ref(x: torch.Tensor, k: int, l: float) -> torch.Tensor:
    """Projection of x/l onto the permutahedron of (1_k, 0) for one row, via the reference PAV."""
    xs = x.detach().numpy().astype(np.float64)
    n = len(xs)
    if k >= n:
        return torch.ones(n, dtype=F64)
    order = np.argsort(-xs, kind="stable")
    s = xs[order]
    w = (np.arange(n) < k).astype(np.float64)
    v = _isotonic_dec_ref(s - l * w)
    m = np.empty(n)
    m[order] = (s - v) / l
    return torch.from_numpy(m)


def _assert_projection(x: torch.Tensor, k: int, l: float, m: torch.Tensor) -> None:
    """Independent of any isotonic solver: m is the projection of z = x/l onto the convex hull
    of the 0/1 vectors with k ones iff m is in it and ⟨z − m, c − m⟩ <= 0 at every vertex c."""
    n = m.numel()
    assert (m >= -1e-12).all() and (m <= 1 + 1e-12).all()
    assert abs(float(m.sum()) - k) < 1e-9
    z = x.detach().to(F64) / l
    for subset in itertools.combinations(range(n), k):
        c = torch.zeros(n, dtype=F64)
        c[list(subset)] = 1.0
        assert float(torch.dot(z - m, c - m)) <= 1e-8 * (1 + float(z.abs().max()))


def test_isotonic_reference_is_a_projection() -> None:
    # Guards the reference formula itself against the vertex characterisation.
    g = torch.Generator().manual_seed(20)
    x = torch.randn(7, dtype=F64, generator=g)
    for k in (1, 3, 6):
        _assert_projection(x, k, 0.4, _sparse_ref(x, k, 0.4))


@pytest.mark.parametrize("l", [0.1, 1.0, 4.0])
def test_sparse_topk_equals_reference(l: float) -> None:
    g = torch.Generator().manual_seed(21)
    x = 2 * torch.randn(4, 8, dtype=F64, generator=g)
    for k in (1, 3, 5, 7):
        p = sparse_topk(x, k, l=l)
        for r in range(4):
            torch.testing.assert_close(p[r], _sparse_ref(x[r], k, l), atol=1e-10, rtol=0)
            _assert_projection(x[r], k, l, p[r])


def test_sparse_topk_masked_and_per_row_k_equal_reference_on_valid_slots() -> None:
    g = torch.Generator().manual_seed(22)
    x = 3 * torch.randn(6, 12, dtype=F64, generator=g)
    mask = torch.rand(6, 12, generator=g) > 0.4
    mask[:, :3] = True
    mask[5] = False
    mask[5, 4] = True
    k = torch.tensor([1, 2, 3, 5, 30, 1])
    x[~mask] = float("nan")
    p = sparse_topk(x, k, mask, l=1.5)
    assert (p[~mask] == 0).all()
    for r in range(6):
        ref = _sparse_ref(x[r, mask[r]], int(k[r]), 1.5)
        torch.testing.assert_close(p[r, mask[r]], ref, atol=1e-10, rtol=0)
    assert (p[4, mask[4]] == 1).all() and (p[5, 4] == 1)


@pytest.mark.parametrize("l", [5.0, 2e4])
def test_sparse_topk_large_scores(l: float) -> None:
    g = torch.Generator().manual_seed(23)
    x = 1e4 * torch.randn(3, 10, dtype=F64, generator=g)
    x[1] = 1e4 + 10 * torch.randn(10, dtype=F64, generator=g)
    for k in (1, 4, 9):
        p = sparse_topk(x, k, l=l)
        for r in range(3):
            torch.testing.assert_close(p[r], _sparse_ref(x[r], k, l), atol=1e-8, rtol=0)
    p32 = sparse_topk(x.float(), 4, l=l)
    torch.testing.assert_close(p32.sum(-1), torch.full((3,), 4.0), atol=1e-4, rtol=0)


def test_sparse_topk_ties_and_sparsity() -> None:
    x = torch.tensor([[3.0, 1.0, 1.0, 0.0, 3.0, -2.0, 1.0]], dtype=F64)
    for k in (1, 2, 3, 4):
        p = sparse_topk(x, k, l=0.5)
        torch.testing.assert_close(p[0], _sparse_ref(x[0], k, 0.5), atol=1e-12, rtol=0)
        assert p[0, 0] == p[0, 4] and p[0, 1] == p[0, 2] == p[0, 6]
    # Tie across the boundary: the two 3.0's share the one slot of k = 1.
    torch.testing.assert_close(
        sparse_topk(x, 1, l=0.5)[0, [0, 4]], torch.full((2,), 0.5, dtype=F64)
    )
    # l below the k/k+1 gap gives the exact hard mask (exactly 0 and 1, not approximately).
    y = torch.tensor([[0.3, 2.0, -1.0, 1.2, 5.0]], dtype=F64)
    assert torch.equal(
        sparse_topk(y, 2, l=0.79), torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0]], dtype=F64)
    )
    # Sparse at moderate l: exact zeros far below the threshold.
    p = sparse_topk(torch.tensor([[4.0, 3.5, 3.0, -5.0, -6.0]], dtype=F64), 2, l=2.0)
    assert p[0, 3] == 0 and p[0, 4] == 0 and 0 < p[0, 2] < 1


def test_sparse_topk_gradient_equals_finite_differences_of_reference() -> None:
    g = torch.Generator().manual_seed(24)
    x = 2 * torch.randn(3, 8, dtype=F64, generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, [0, 5]] = False
    k = torch.tensor([3, 2, 5])
    jac = torch.autograd.functional.jacobian(lambda s: sparse_topk(s, k, mask, l=1.5), x)
    nontrivial = 0
    for r in range(3):
        v = mask[r]
        kr = int(k[r])
        j_op = jac[r, :, r, :][v][:, v]
        j_fd = _fd_jacobian(lambda s, kr=kr: _sparse_ref(s, kr, 1.5), x[r, v])
        torch.testing.assert_close(j_op, j_fd, atol=1e-6, rtol=0)
        nontrivial += int((j_op.abs() > 1e-3).sum())
        assert (jac[r, :, r][:, ~v] == 0).all() and (jac[r, ~v] == 0).all()
    assert nontrivial > 0  # some blocks were pooled, so the check is not vacuous
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: sparse_topk(s, k, mask, l=1.5), (xg,))


def test_sparse_topk_all_selected_rows_get_zero_gradient_and_bfloat16() -> None:
    x = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(25))
    x.requires_grad_()
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    p = sparse_topk(x, torch.tensor([2, 2]), mask, l=3.0)
    assert (p[0, :2] == 1).all()
    (grad,) = torch.autograd.grad((p * torch.arange(5.0, dtype=F64)).sum(), x)
    assert (grad[0] == 0).all() and (grad[1] != 0).any()
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    pb = sparse_topk(xb, 2, l=1.0)
    assert pb.dtype == torch.bfloat16
    pb.float().sum().backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16
