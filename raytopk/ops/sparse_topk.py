"""Sparse soft top-k (Sander, Puigcerver, Djolonga, Peyré, Blondel, "Fast, Differentiable and
Sparse Top-k: a Convex Analysis Perspective", ICML 2023, arXiv 2302.01425), docs/protocol.md §2.3.

Notation: x ∈ R^N one row's scores over its valid slots V (n = |V|), l > 0 the regularisation,
w = (1_k, 0_{n−k}), P(w) the permutahedron of w, s = x sorted descending (permutation σ).

    m = argmin_{μ ∈ P(w)} ½‖μ − x/l‖²          (Euclidean projection; m ∈ [0,1]^n, Σm = k)

computed as  v* = argmin_{v_1 ≥ … ≥ v_n} ½‖v − (s − l·w)‖²  (isotonic regression),
m_σ = (s − v*)/l.  On a pooled block G of the solution, v*_G = mean_G(s) − l·mean_G(w), so

    m_i = (s_i − mean_G(s))/l + mean_G(w)      (i ∈ G; a singleton block gives m_i = w_i exactly)

The isotonic regression is solved exactly by pool-adjacent-violators (PAV), O(n) after the sort.
Its Jacobian is the block-averaging matrix, so the vector-Jacobian product is, in sorted order,

    g_s = (g_σ − mean_G(g_σ)) / l       (averaged within each pooled block G)

and un-permuted; only the sort permutation and each slot's block id are saved.

Masks, k, dtypes: masked slots are absent (they sort last and never enter the PAV; output 0, no
gradient); k is per row; a row with k ≥ n gives 1 at every valid slot with zero gradient; 16-bit
inputs are computed in float32 (the PAV always runs in float64) and returned in their dtype.

Backends: on CPU the PAV is a numba kernel over rows (compiled lazily on first use, cached on
disk). On other devices the sort and everything around it stay on the device and only the sorted
scores go to the CPU kernel and back: PAV is sequential per row, the transfer is O(BN) like the
result, and it costs one device synchronisation per call.

Deviations from the authors' code (read, not copied): their port unrolls 250 Dykstra iterations
through autograd (approximate, memory grows with the iterations) and feeds m into a logits loss;
here PAV is exact and the backward is the closed form above. Masks and per-row k are supported.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from raytopk.ops._registry import register
from raytopk.ops._validate import check_param, prepare

__all__ = ["DEFAULT_L", "sparse_topk", "step_bytes", "unclipped_membership"]

# l of the RecFlow protocol (docs/protocol.md §2.3): the one default of every public
# function taking l.
DEFAULT_L = 1.0


@numba.njit(cache=True, nogil=True)
def _pav_rows(s, k, n, l):  # pragma: no cover - compiled
    """Sparse top-k on rows of s (R, N) float64 sorted descending (valid first, n[r] of them).

    Returns (m, blk): m (R, N) the membership in sorted order (0 past n), blk (R, N) int64 the
    first sorted position of each slot's pooled block (a slot past n is its own block).
    """
    rows, size = s.shape
    m = np.zeros((rows, size), np.float64)
    blk = np.empty((rows, size), np.int64)
    start = np.empty(size, np.int64)
    ysum = np.empty(size, np.float64)
    cnt = np.empty(size, np.int64)
    for r in range(rows):
        nr = n[r]
        kr = k[r]
        for i in range(nr, size):
            blk[r, i] = i
        if kr >= nr:
            for i in range(nr):
                m[r, i] = 1.0
                blk[r, i] = i
            continue
        # PAV for a non-increasing fit of y = s − l·w: push each point as a block and merge
        # while the previous block's mean is below the last one's (a violation).
        nb = 0
        for i in range(nr):
            y = s[r, i] - (l if i < kr else 0.0)
            start[nb] = i
            ysum[nb] = y
            cnt[nb] = 1
            nb += 1
            while nb > 1 and ysum[nb - 2] * cnt[nb - 1] < ysum[nb - 1] * cnt[nb - 2]:
                ysum[nb - 2] += ysum[nb - 1]
                cnt[nb - 2] += cnt[nb - 1]
                nb -= 1
        for b in range(nb):
            lo = start[b]
            hi = start[b + 1] if b + 1 < nb else nr
            if hi - lo == 1:
                m[r, lo] = 1.0 if lo < kr else 0.0
                blk[r, lo] = lo
                continue
            # m_i = (s_i − mean_G(s))/l + mean_G(w), from s itself (not y) for accuracy.
            ssum = 0.0
            for i in range(lo, hi):
                ssum += s[r, i]
            smean = ssum / (hi - lo)
            wmean = max(0, min(hi, kr) - lo) / (hi - lo)
            for i in range(lo, hi):
                v = (s[r, i] - smean) / l + wmean
                m[r, i] = min(max(v, 0.0), 1.0)  # rounding only; the exact m is in [0, 1]
                blk[r, i] = lo
    return m, blk


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(
    x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, l: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, order, blk, active_sorted) for x (R, N)."""
    size = x.shape[-1]
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    n = valid.sum(-1)  # (R,)
    key = x.masked_fill(~valid, float("-inf"))  # masked slots sort last; padding may be NaN
    sv, order = torch.sort(key, dim=-1, descending=True)  # (R, N)
    pos = torch.arange(size, device=x.device)
    vs = pos < n.unsqueeze(-1)  # sorted position holds a valid slot
    sv = torch.where(vs, sv, torch.zeros_like(sv))
    # PAV is sequential per row: run it on the CPU whatever the device (see module docstring).
    s_np = sv.detach().to("cpu", torch.float64).contiguous().numpy()
    k_np = k.detach().cpu().contiguous().numpy()
    n_np = n.detach().cpu().contiguous().numpy()
    m_np, blk_np = _pav_rows(s_np, k_np, n_np, float(l))
    m_sorted = torch.from_numpy(m_np).to(device=x.device, dtype=x.dtype)
    blk = torch.from_numpy(blk_np).to(x.device)
    m = torch.zeros_like(x).scatter(-1, order, m_sorted)
    active = vs & (k < n).unsqueeze(-1)
    return m, order, blk, active


class _SparseTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, mask, l):  # type: ignore[override]
        m, order, blk, active = _forward(x, k, mask, l)
        ctx.save_for_backward(order, blk, active)
        ctx.l = l
        return m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        order, blk, active = ctx.saved_tensors
        gs = g.gather(-1, order)  # (R, N) upstream gradient in sorted order
        gs = torch.where(active, gs, torch.zeros_like(gs))
        sums = torch.zeros_like(gs).scatter_add(-1, blk, gs)
        cnt = torch.zeros_like(gs).scatter_add(-1, blk, torch.ones_like(gs))
        mean = (sums / cnt.clamp_min(1.0)).gather(-1, blk)
        out = torch.where(active, (gs - mean) / ctx.l, torch.zeros_like(gs))
        gx = torch.zeros_like(out).scatter(-1, order, out)
        return gx, None, None, None


def step_bytes(batch: int, n: int, itemsize: int = 4) -> int:
    """Peak bytes of one stage's training forward+backward: about twelve (B, N) tensors of
    the sort, the scatter, the BCE stage loss and the gradients, plus the PAV kernel's float64
    membership and int64 block ids (16 bytes per slot, in numpy: not seen by torch's
    allocator)."""
    return batch * n * (12 * itemsize + 16)


def unclipped_membership(
    scores: torch.Tensor, p: torch.Tensor, keep: torch.Tensor, *, l: float = DEFAULT_L
) -> torch.Tensor:
    """The loss form ``hinge``'s input (raytopk.losses): u = x/l − τ with m = clip(u, 0, 1):
    the permutahedron of (1_k, 0_{N−k}) is the capped
    simplex {m ∈ [0,1]^N, Σ m = k}, so sparse top-k's m is x/l projected onto it, a clip at the
    threshold τ. τ from the operator's own m: x_i/l − m_i at its free slots (0 < m < 1), with
    its gradient ∂τ/∂x_j = 1/(l·#free) there (the operator's own pooled-block Jacobian); in a row
    without free slot, the middle of the feasible interval (no gradient). 0 outside ``keep``."""
    xs = scores / l
    xd, pd = xs.detach(), p.detach()
    free = keep & (pd > 0) & (pd < 1)
    nfree = free.sum(-1, keepdim=True)
    tau_free = torch.where(free, xd - pd, torch.zeros_like(xd)).sum(-1, keepdim=True)
    tau_free = tau_free / nfree.clamp(min=1)
    lo = torch.where(keep & (pd <= 0), xd, torch.full_like(xd, -torch.inf)).amax(-1, keepdim=True)
    hi = torch.where(keep & (pd >= 1), xd - 1.0, torch.full_like(xd, torch.inf))
    hi = hi.amin(-1, keepdim=True)
    mid = torch.where(torch.isfinite(lo) & torch.isfinite(hi), (lo + hi) / 2, torch.zeros_like(lo))
    mid = torch.where(torch.isfinite(lo) & ~torch.isfinite(hi), lo, mid)
    mid = torch.where(~torch.isfinite(lo) & torch.isfinite(hi), hi, mid)
    g = torch.where(free, xs, torch.zeros_like(xs)).sum(-1, keepdim=True) / nfree.clamp(min=1)
    tau = torch.where(nfree > 0, tau_free, mid) + (g - g.detach())
    return torch.where(keep, xs - tau, torch.zeros_like(xs))


@register(
    "sparse_topk",
    param="l",
    hard_limit=1e-3,
    sums_to_k=True,
    complexity="O(N log N)",
    step_bytes=step_bytes,
    bf16=True,
    bf16_reason="sort in float32, PAV in float64, returned in bf16",
    unclipped=unclipped_membership,
    default_form="hinge",
)
def sparse_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    l: float = DEFAULT_L,
) -> torch.Tensor:
    """Sparse soft top-k membership: the projection of x/l onto the permutahedron of (1_k, 0).

    Args:
        scores: (..., N) float scores.
        k: int, or a LongTensor of shape scores.shape[:-1] (k per row), every entry >= 1.
        mask: (..., N) bool, True = valid, or None.
        l: regularisation l > 0 (smaller = harder; exactly the hard top-k once l is below the
            gap x_[k] − x_[k+1]).
    Returns (..., N) in [0, 1] in the dtype of scores, Σ = k per row over valid slots: 0 at
    masked slots, 1 at the valid slots of rows with k >= #valid.
    """
    scores, k_rows, mask_t = prepare(scores, k, mask)
    l_f = check_param("l", l)
    size = scores.shape[-1]
    x = scores.to(_compute_dtype(scores.dtype)).reshape(-1, size)  # (R, N)
    m = None if mask_t is None else mask_t.reshape(-1, size)
    out = _SparseTopK.apply(x, k_rows.reshape(-1), m, l_f)
    return out.reshape(scores.shape).to(scores.dtype)
