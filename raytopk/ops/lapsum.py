"""LapSum soft top-k (Struski, Bednarczyk, Podolak, Tabor, "LapSum — One Method to Differentiate
Them All: Ranking, Sorting and Top-k Selection", ICML 2025, arXiv 2503.06242),
docs/protocol.md §2.2.

Notation: x ∈ R^N one row's scores over its valid slots V (n = |V|), α > 0 the scale,
s = x/α, F the Laplace CDF, F(t) = ½eᵗ (t ≤ 0), 1 − ½e⁻ᵗ (t > 0).

    p_i = F(s_i − b)   with b the unique solution of   h(b) = Σ_{i∈V} F(s_i − b) = k

so Σ p = k exactly and p ∈ (0, 1). With f_i = F'(s_i − b) = ½e^{−|s_i − b|}, implicit
differentiation of h(b) = k gives ∂b/∂x_j = f_j / (α Σf), hence the vector-Jacobian product

    g_x = (f/α) ⊙ (g − ⟨f/Σf, g⟩).

Closed-form b after one sort (O(N log N)): with s sorted ascending (s_1 ≤ … ≤ s_n),
B_j = Σ_{i≤j} e^{s_i − s_j} and A_j = Σ_{i≥j} e^{s_j − s_i},

    h(s_j) = ½B_j − ½A_j + n − j + ½          (non-increasing in j),

a search finds c = #{j : h(s_j) ≥ k}, so b ∈ [s_c, s_{c+1}] (torch.searchsorted, vectorised over
rows, on non-CPU devices; on CPU one numba pass per row computes B, A, c and b together). There
h(b) = ½e^{−b}L + (n − c) − ½e^{b}R with L = Σ_{i≤c} e^{s_i}, R = Σ_{i>c} e^{−s_i}, and
h(b) = k is the quadratic R·u² − 2m·u − L = 0 in u = e^b, m = n − c − k:

    e^b = (m + √(m² + LR)) / R  (m > 0),    e^b = L / (√(m² + LR) − m)  (m < 0),
    b = ½ log(L/R)  (m = 0),

each branch free of cancellation. log L and log R come from logcumsumexp (prefix and suffix), and
LR = B_c·A_{c+1}·e^{s_c − s_{c+1}} ≤ n², so scores of any magnitude (|x|/α in the thousands) stay
finite (each row is shifted by its maximum first, p being shift-invariant, so float32 keeps its
resolution on rows like 1e4 + small spread). c = 0 (b < s_1) and c = n (b > s_n) are the same
formulas with L = 0 or R = 0.

Masks, k, dtypes: masked slots are absent (they never enter the sort or the sums; output 0, no
gradient); k is per row; a row with k ≥ n gives 1 at every valid slot with zero gradient; 16-bit
inputs are computed in float32 and returned in their dtype.

Additions to the paper's formulation (the authors' code was not used): masked slots and per-row
k; the per-row shift above; the quadratic solved in whichever of its two algebraic forms avoids
cancellation; the backward's f/Σf computed as a softmax of −|t| (finite when every f underflows).
Only t = s − b and the active-slot mask are saved for the backward.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from raytopk.ops._registry import register
from raytopk.ops._validate import check_param, prepare

__all__ = ["DEFAULT_ALPHA", "lapsum", "lapsum_threshold", "log_membership", "step_bytes"]

_LN2 = math.log(2.0)

# α of the RecFlow protocol (docs/protocol.md §2.2): the one default of every public
# function taking α.
DEFAULT_ALPHA = 5.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@numba.njit(cache=True, nogil=True)
def _threshold_rows(sv, k, n):  # pragma: no cover - compiled
    """b per row from sv (R, N) float64 sorted ascending (the n[r] valid values first), by the
    same closed form as ``_threshold_torch``; B_j and A_j by their recurrences
    B_j = B_{j−1}·e^{s_{j−1} − s_j} + 1 and A_j = A_{j+1}·e^{s_j − s_{j+1}} + 1 (every factor ≤ 1,
    so no logcumsumexp is needed). Rows with k >= n get 0."""
    rows, size = sv.shape
    out = np.zeros(rows, np.float64)
    bb = np.empty(size, np.float64)
    aa = np.empty(size, np.float64)
    for r in range(rows):
        nr = n[r]
        kr = k[r]
        if kr >= nr:
            continue
        bb[0] = 1.0
        for j in range(1, nr):
            bb[j] = bb[j - 1] * np.exp(sv[r, j - 1] - sv[r, j]) + 1.0
        aa[nr - 1] = 1.0
        for j in range(nr - 2, -1, -1):
            aa[j] = aa[j + 1] * np.exp(sv[r, j] - sv[r, j + 1]) + 1.0
        c = 0  # #{j : h(s_j) >= k}; h is non-increasing, so stop at the first j below k
        while c < nr and 0.5 * bb[c] - 0.5 * aa[c] + (nr - c - 1) + 0.5 >= kr:
            c += 1
        m = float(nr - c - kr)
        log_l = sv[r, c - 1] + np.log(bb[c - 1]) if c >= 1 else -np.inf
        log_r = np.log(aa[c]) - sv[r, c] if c < nr else -np.inf
        root = np.sqrt(m * m + np.exp(log_l + log_r))
        if m > 0:
            b = np.log(m + root) - log_r
        elif m < 0:
            b = log_l - np.log(root - m)
        else:
            b = 0.5 * (log_l - log_r)
        if c >= 1 and b < sv[r, c - 1]:
            b = sv[r, c - 1]
        if c < nr and b > sv[r, c]:
            b = sv[r, c]
        out[r] = b
    return out


def _threshold(
    s: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """b per row (R,); on CPU the O(N) pass after the sort is one numba loop (torch's
    logcumsumexp and the elementwise chain cost a few times the sort there), elsewhere torch."""
    if s.device.type != "cpu":
        return _threshold_torch(s, k, valid, n)
    sv = torch.sort(s.masked_fill(~valid, float("inf")), dim=-1).values
    b = _threshold_rows(sv.to(torch.float64).numpy(), k.numpy(), n.numpy())
    return torch.from_numpy(b).to(s.dtype)


def _threshold_torch(
    s: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """b per row (R,) for scaled scores s (R, N) (masked slots ignored); rows with k >= n give
    an arbitrary finite value (the caller overrides them)."""
    size = s.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    key = s.masked_fill(~valid, float("inf"))  # masked slots sort last
    sv = torch.sort(key, dim=-1).values  # (R, N) ascending
    pos = torch.arange(size, device=s.device)
    vs = pos < n.unsqueeze(-1)  # (R, N) sorted position holds a valid slot
    sv = torch.where(vs, sv, torch.zeros_like(sv))  # finite placeholders, never used
    pre = torch.logcumsumexp(torch.where(vs, sv, neg_inf), dim=-1)  # log Σ_{i≤j} e^{s_i}
    suf = torch.logcumsumexp(torch.where(vs, -sv, neg_inf).flip(-1), dim=-1).flip(-1)
    # suf_j = log Σ_{i≥j} e^{−s_i}
    log_b = torch.where(vs, pre - sv, neg_inf)  # log B_j
    log_a = torch.where(vs, suf + sv, neg_inf)  # log A_j
    nf = n.unsqueeze(-1).to(s.dtype)
    h = 0.5 * log_b.exp() - 0.5 * log_a.exp() + (nf - (pos + 1).to(s.dtype)) + 0.5
    # −h ascending; +inf past the valid positions; cummax repairs rounding-level non-monotonicity
    # so that searchsorted sees a sorted sequence.
    neg_h = torch.where(vs, -h, torch.full_like(h, float("inf"))).cummax(dim=-1).values
    kf = k.to(s.dtype)
    c = torch.searchsorted(neg_h, -kf.unsqueeze(-1), right=True).squeeze(-1)  # (R,) in [0, n]
    c = torch.minimum(c, n)

    lo_idx = (c - 1).clamp(0, size - 1).unsqueeze(-1)
    hi_idx = c.clamp(0, size - 1).unsqueeze(-1)
    has_lo = c >= 1
    has_hi = c < n
    log_l = torch.where(has_lo, pre.gather(-1, lo_idx).squeeze(-1), neg_inf)  # log L
    log_r = torch.where(has_hi, suf.gather(-1, hi_idx).squeeze(-1), neg_inf)  # log R
    m = (n - c - k).to(s.dtype)
    root = torch.sqrt(m * m + torch.exp(log_l + log_r))
    b_pos = torch.log(m + root) - log_r
    b_neg = log_l - torch.log(root - m)
    b_zero = 0.5 * (log_l - log_r)
    b = torch.where(m > 0, b_pos, torch.where(m < 0, b_neg, b_zero))
    # Rounding may step a hair outside the bracket; the exact root lies inside it.
    lo = torch.where(has_lo, sv.gather(-1, lo_idx).squeeze(-1), neg_inf)
    hi = torch.where(has_hi, sv.gather(-1, hi_idx).squeeze(-1), -neg_inf)
    b = torch.minimum(torch.maximum(b, lo), hi)
    full = k >= n
    return torch.where(full | ~torch.isfinite(b), torch.zeros_like(b), b)


def _scaled(x: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = (x − max_V x)/α with masked slots 0. p is shift-invariant; removing the row's maximum
    first keeps float32 resolution for rows like 1e4 + small spread (x − max is exact there)."""
    x = x.masked_fill(~valid, 0.0)  # before any arithmetic: padding may hold inf/NaN
    top = x.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows without valid slots
    return (x - top).masked_fill(~valid, 0.0) / alpha


def _forward(
    x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, t, active) for x (R, N): t = s − b, active = valid slots of rows with k < n."""
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    n = valid.sum(-1)
    s = _scaled(x, valid, alpha)
    b = _threshold(s, k, valid, n)
    t = s - b.unsqueeze(-1)
    half_e = 0.5 * torch.exp(-t.abs())  # ½e^{−|t|}, never overflows
    p = torch.where(t <= 0, half_e, 1.0 - half_e)
    full = (k >= n).unsqueeze(-1)
    p = torch.where(full, torch.ones_like(p), p)
    p = torch.where(valid, p, torch.zeros_like(p))
    return p, t, valid & ~full


class _LapSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, mask, alpha):  # type: ignore[override]
        p, t, active = _forward(x, k, mask, alpha)
        ctx.save_for_backward(t, active)
        ctx.alpha = alpha
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        t, active = ctx.saved_tensors
        g = g.to(t.dtype)
        log_f = torch.where(active, -t.abs(), torch.full_like(t, float("-inf")))  # log 2f
        has = active.any(-1, keepdim=True)
        # f/Σf as a softmax of −|t|: stable even when every f underflows (huge |x|/α gaps).
        w = torch.softmax(torch.where(has, log_f, torch.zeros_like(log_f)), dim=-1)
        w = torch.where(active, w, torch.zeros_like(w))
        inner = torch.where(active, w * g, torch.zeros_like(g)).sum(-1, keepdim=True)
        f = 0.5 * log_f.exp()  # 0 at inactive slots
        gx = torch.where(active, f / ctx.alpha * (g - inner), torch.zeros_like(g))
        return gx, None, None, None


def _flatten(
    scores: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    size = scores.shape[-1]
    x = scores.to(_compute_dtype(scores.dtype)).reshape(-1, size)  # (R, N)
    m = None if mask is None else mask.reshape(-1, size)
    return x, k.reshape(-1), m


def lapsum_threshold(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """The threshold b (shape scores.shape[:-1], no gradient) with Σ_i F(x_i/α − b) = k over the
    valid slots; 0 for rows with k >= n (every valid slot selected)."""
    scores, k_rows, mask_t = prepare(scores, k, mask)
    alpha_f = check_param("alpha", alpha)
    x, kr, m = _flatten(scores.detach(), k_rows, mask_t)
    valid = torch.ones_like(x, dtype=torch.bool) if m is None else m
    b = _threshold(_scaled(x, valid, alpha_f), kr, valid, valid.sum(-1))
    top = x.masked_fill(~valid, float("-inf")).amax(-1)
    b = torch.where(k_rows.reshape(-1) >= valid.sum(-1), torch.zeros_like(b), b + top / alpha_f)
    return b.reshape(scores.shape[:-1]).to(scores.dtype)


def step_bytes(batch: int, n: int, itemsize: int = 4) -> int:
    """Peak bytes of one stage's training forward+backward: the sort (values and int64
    indices), s, t, p, the saved t and active mask, the BCE stage loss and the gradients, about
    twelve (B, N) tensors."""
    return 12 * batch * n * itemsize


def _log_laplace_cdf(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log F(t), log(1 − F(t))) of the Laplace CDF, exact for every finite t."""
    tail = torch.log1p(-0.5 * torch.exp(-t.abs()))  # log(1 − ½e^{−|t|}) ∈ [−log 2, 0]
    return (
        torch.where(t <= 0, t - _LN2, tail),
        torch.where(t <= 0, tail, -t - _LN2),
    )


def _lapsum_t(
    scores: torch.Tensor, k: int, mask: torch.Tensor, alpha: float, keep: torch.Tensor
) -> torch.Tensor:
    """t = x/α − b of LapSum with b's implicit gradient ∂b/∂x = f/(αΣf) (docs/protocol.md §2.2), as
    a differentiable tensor; 0 outside ``keep``."""
    x = scores.masked_fill(~mask, 0.0)
    top = x.detach().masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    s = (x - top) / alpha  # shift-invariant; keeps float32 resolution at large scores
    b = lapsum_threshold(s.detach(), k, mask, alpha=1.0).unsqueeze(-1)  # (B, 1)
    t0 = (s.detach() - b).masked_fill(~keep, 0.0)
    log_f = torch.where(keep, -t0.abs(), torch.full_like(t0, float("-inf")))
    has = keep.any(-1, keepdim=True)
    w = torch.softmax(torch.where(has, log_f, torch.zeros_like(log_f)), dim=-1)  # f/Σf
    w = torch.where(keep, w, torch.zeros_like(w))
    ws = (w * s.masked_fill(~keep, 0.0)).sum(-1, keepdim=True)
    b = b + ws - ws.detach()  # value b, gradient Σ_j (f_j/Σf) ∂s_j
    return torch.where(keep, s - b, torch.zeros_like(s))


def log_membership(
    scores: torch.Tensor,
    k: int,
    mask: torch.Tensor,
    keep: torch.Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 − p)) of LapSum's membership p = F(x/α − b), exact in log space from its
    threshold b (the loss form ``bce_log`` of raytopk.losses); 0 outside ``keep``."""
    return _log_laplace_cdf(_lapsum_t(scores, k, mask, alpha, keep))


@register(
    "lapsum",
    param="alpha",
    hard_limit=1e-3,
    sums_to_k=True,
    complexity="O(N log N)",
    step_bytes=step_bytes,
    bf16=True,
    bf16_reason="sort, logcumsumexp and the closed-form b in float32, returned in bf16",
    log_membership=log_membership,
    default_form="bce_log",
)
def lapsum(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """LapSum soft top-k membership p_i = F(x_i/α − b), Σ_{valid} p = k.

    Args:
        scores: (..., N) float scores.
        k: int, or a LongTensor of shape scores.shape[:-1] (k per row), every entry >= 1.
        mask: (..., N) bool, True = valid, or None.
        alpha: scale α > 0 (smaller = harder).
    Returns (..., N) in [0, 1] in the dtype of scores: 0 at masked slots, 1 at the valid slots of
    rows with k >= #valid.
    """
    scores, k_rows, mask_t = prepare(scores, k, mask)
    alpha_f = check_param("alpha", alpha)
    x, kr, m = _flatten(scores, k_rows, mask_t)
    p = _LapSum.apply(x, kr, m, alpha_f)
    return p.reshape(scores.shape).to(scores.dtype)
