"""DFTopK's CPU selection kernel (numba): θ_k and the two boundary slots π(k), π(k+1) per row with
one selection (docs/protocol.md §2.1; the operator and its notation are in raytopk/ops/dftopk.py).

Per row, for k + 1 <= 16 (the training shapes: k = 10): a lower bound on x_[k+1] from k + 1 group
maxima, one branch-free pass keeping the values above it, and the k + 1 largest of those by
insertion, straight from the row. Otherwise: v = x_[k+1] by a three-way-partition quickselect
(O(N) expected; insertion for small rank sets; a sampled Floyd-Rivest-style filter first for long
rows), then x_[k] = the minimum of the k slots the partition put in front of v. Every path names
the same boundary slots (the first holding x_[k] and x_[k+1]). Rows run in parallel for large
batches. A row with
a NaN/inf valid score is flagged (index −2) and reported by ``check_finite`` with its number.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from raytopk.ops._validate import check_finite

__all__ = ["PARALLEL_MIN_ELEMENTS", "threshold_numba"]

PARALLEL_MIN_ELEMENTS = 1 << 15  # below this, numba's thread start-up costs more than it saves

_SAMPLE_MIN = 4096  # rows at least this long use the sampled filter first
_SMALL = 16  # rank sets of at most this size are kept by insertion instead of quickselect


@numba.njit(cache=True, nogil=True)
def _quickselect(vals, n, t):  # pragma: no cover - compiled
    """Partition vals[:n] in place (descending) so that vals[t] = x_[t+1] and vals[:t] hold the
    t largest. Three-way partition around a median-of-three pivot: ties cost O(n)."""
    lo, hi = 0, n - 1
    while lo < hi:
        a, b, c = vals[lo], vals[(lo + hi) >> 1], vals[hi]
        if a < b:
            a, b = b, a
        if b < c:
            b = c
            if a < b:
                b = a
        pivot = b
        lt, i, gt = lo, lo, hi
        while i <= gt:
            v = vals[i]
            if v > pivot:
                vals[i] = vals[lt]
                vals[lt] = v
                lt += 1
                i += 1
            elif v < pivot:
                vals[i] = vals[gt]
                vals[gt] = v
                gt -= 1
            else:
                i += 1
        if t < lt:
            hi = lt - 1
        elif t > gt:
            lo = gt + 1
        else:
            return


@numba.njit(cache=True, nogil=True)
def _boundary_values(vals, n, k):  # pragma: no cover - compiled
    """(x_[k], x_[k+1]) of vals[:n] for 1 <= k < n, with one selection."""
    if k + 1 <= _SMALL:
        # Keep the k+1 largest sorted descending by insertion: one comparison per element
        # for all but the few that enter the set.
        m = k + 1
        buf = np.empty(m, vals.dtype)
        for i in range(m):
            v = vals[i]
            j = i
            while j > 0 and buf[j - 1] < v:
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = v
        for i in range(m, n):
            v = vals[i]
            if v > buf[m - 1]:
                j = m - 1
                while j > 0 and buf[j - 1] < v:
                    buf[j] = buf[j - 1]
                    j -= 1
                buf[j] = v
        return buf[k - 1], buf[k]
    if n - k + 1 <= _SMALL:
        # Mirror image: keep the n−k+1 smallest sorted ascending; x_[k] is their maximum.
        m = n - k + 1
        buf = np.empty(m, vals.dtype)
        for i in range(m):
            v = vals[i]
            j = i
            while j > 0 and buf[j - 1] > v:
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = v
        for i in range(m, n):
            v = vals[i]
            if v < buf[m - 1]:
                j = m - 1
                while j > 0 and buf[j - 1] > v:
                    buf[j] = buf[j - 1]
                    j -= 1
                buf[j] = v
        return buf[m - 1], buf[m - 2]
    _quickselect(vals, n, k)
    hi = vals[0]  # x_[k] = min of the k largest, now in vals[:k]
    for j in range(1, k):
        if vals[j] < hi:
            hi = vals[j]
    return hi, vals[k]


@numba.njit(cache=True, nogil=True)
def _sampled_boundary(row, mrow, has_mask, n, k, vals, ids, scratch):  # pragma: no cover
    """Floyd–Rivest-style filter for long rows, read straight from the row.

    Brackets x_[k], x_[k+1] between two order statistics of a strided sample of the valid
    slots; one pass counts the values above the bracket and copies the few inside it (with
    their slots) to vals/ids, where the selection finishes. Returns (found, hi, lo, hi_slot,
    lo_slot); found=False when the sample missed (the caller falls back to a full quickselect).
    """
    n_cols = row.shape[0]
    s_max = min(max(n_cols // 32, 128), 1024)  # sorting the sample must stay cheap
    sample = np.empty(s_max, row.dtype)
    s = 0
    for i in range(s_max):
        pos = (i * n_cols) // s_max
        if not has_mask or mrow[pos]:
            sample[s] = row[pos]
            s += 1
    if s < 64:
        return False, 0.0, 0.0, -1, -1
    sample = sample[:s]
    sample.sort()  # ascending; descending sample rank q is sample[s - 1 - q]
    q = (k * s) // n
    frac = k / n
    slack = int(3.0 * np.sqrt(s * frac * (1.0 - frac))) + 3  # ≈ 3 standard deviations
    upper = np.inf if q - slack < 0 else sample[s - 1 - (q - slack)]
    lower = -np.inf if q + slack > s - 1 else sample[s - 1 - (q + slack)]
    above = 0
    min_above = np.inf
    min_above_slot = -1
    w = 0
    for i in range(n_cols):
        if has_mask and not mrow[i]:
            continue
        v = row[i]
        if v - v != 0.0:  # NaN or ±inf (v − v is NaN for both)
            return False, 0.0, 0.0, -2, -2
        if v > upper:
            above += 1
            if v < min_above:
                min_above = v
                min_above_slot = i
        elif v >= lower:
            vals[w] = v
            ids[w] = i
            w += 1
    # Needed: descending ranks k−1 and k (0-based) inside the bracket, or x_[k] the smallest
    # value above it.
    p = k - above
    if p < 0 or p >= w:
        return False, 0.0, 0.0, -1, -1
    if p == 0:
        top = 0
        for i in range(1, w):
            if vals[i] > vals[top]:
                top = i
        return True, min_above, vals[top], min_above_slot, ids[top]
    scratch[:w] = vals[:w]
    hi, lo = _boundary_values(scratch, w, p)
    hi_slot, lo_slot = _find_slots(vals, ids, w, hi, lo)
    return True, hi, lo, hi_slot, lo_slot


@numba.njit(cache=True, nogil=True)
def _find_slots(vals, ids, w, hi, lo):  # pragma: no cover - compiled
    """Slots of the values hi and lo among vals[:w] (distinct slots when hi == lo)."""
    hi_slot = -1
    lo_slot = -1
    for j in range(w):
        v = vals[j]
        if hi_slot < 0 and v == hi:
            hi_slot = ids[j]
        elif lo_slot < 0 and v == lo:
            lo_slot = ids[j]
        if hi_slot >= 0 and lo_slot >= 0:
            break
    return hi_slot, lo_slot


@numba.njit(cache=True, nogil=True)
def _small_k_boundary(row, mrow, has_mask, k, cand, cand_slots, buf, slots):  # pragma: no cover
    """(finite, hi, lo, hi_slot, lo_slot) for k + 1 <= _SMALL, straight from the row.

    1. A lower bound on x_[k+1]: split the row into k + 1 groups; the smallest group maximum is
       at most x_[k+1] (the k + 1 maxima are k + 1 values at least that large). A group with no
       valid slot makes the bound −∞.
    2. One branch-free pass copies the valid values at or above the bound (and their slots, in
       slot order) to cand and checks finiteness; about 30 of 200 standard-normal scores pass.
    3. The k + 1 largest candidates, sorted descending by insertion into buf (with slots).

    Ties: an equal value never passes an earlier one and never enters a full set, so buf ends
    as the k + 1 largest under (value descending, slot ascending) whatever was dropped in step 2
    (only values below x_[k+1] are), and hi_slot / lo_slot are the first slots holding x_[k] /
    x_[k+1] (the first two when they are equal), as ``_find_slots`` gives on the other paths."""
    m = k + 1
    n_cols = row.shape[0]
    bound = np.inf
    for g in range(m):
        mx = -np.inf
        if has_mask:
            for i in range(g * n_cols // m, (g + 1) * n_cols // m):
                v = row[i]
                mx = v if (v > mx) & (mrow[i] != 0) else mx
        else:
            for i in range(g * n_cols // m, (g + 1) * n_cols // m):
                v = row[i]
                mx = v if v > mx else mx  # NaN never wins (it is caught in step 2)
        bound = mx if mx < bound else bound
    w = 0
    finite = True
    if has_mask:
        for i in range(n_cols):
            v = row[i]
            ok = mrow[i] != 0
            finite &= (v - v == 0.0) | (not ok)  # NaN or ±inf at a valid slot
            cand[w] = v
            cand_slots[w] = i
            w += ok & (v >= bound)
    else:
        for i in range(n_cols):
            v = row[i]
            finite &= v - v == 0.0
            cand[w] = v
            cand_slots[w] = i
            w += v >= bound
    if not finite:
        return False, 0.0, 0.0, -1, -1
    for i in range(w):
        v = cand[i]
        if i < m:
            j = i
        elif v > buf[m - 1]:
            j = m - 1
        else:
            continue
        while j > 0 and buf[j - 1] < v:
            buf[j] = buf[j - 1]
            slots[j] = slots[j - 1]
            j -= 1
        buf[j] = v
        slots[j] = cand_slots[i]
    hi = buf[k - 1]
    lo = buf[k]
    hi_slot = -1
    lo_slot = slots[k]
    for j in range(m):  # the first slot holding x_[k]: the front-most entry equal to it
        if buf[j] == hi:
            hi_slot = slots[j]
            if hi == lo and j < k:
                lo_slot = slots[j + 1]
            break
    return True, hi, lo, hi_slot, lo_slot


@numba.njit(cache=True, nogil=True)
def _rows(
    x, mask, has_mask, k, theta, idx, start, stop, vals, ids, scratch, slots, tau, z, want_z
):  # pragma: no cover
    """θ and the boundary slots [π(k), π(k+1)] for rows start..stop−1 (−1 where k >= n;
    idx[r, 0] = −2 where a valid score is NaN or ±inf: the kernel doubles as the finiteness
    check, saving the separate isfinite pass), and when want_z the logits z (R, N)."""
    n_cols = x.shape[1]
    for r in range(start, stop):
        _row(x, mask, has_mask, k, theta, idx, r, vals, ids, scratch, slots)
        if want_z and idx[r, 0] != -2:
            th = theta[r]
            if has_mask:
                for j in range(n_cols):
                    z[r, j] = (x[r, j] - th) / tau if mask[r, j] else -np.inf
            else:
                for j in range(n_cols):
                    z[r, j] = (x[r, j] - th) / tau


@numba.njit(cache=True, nogil=True)
def _row(x, mask, has_mask, k, theta, idx, r, vals, ids, scratch, slots):  # pragma: no cover
    """θ and the boundary slots of row r (see _rows)."""
    n_cols = x.shape[1]
    kr = k[r]
    if has_mask:
        n = 0
        for j in range(n_cols):
            n += mask[r, j]
    else:
        n = n_cols
    if kr >= n:
        theta[r] = -np.inf
        idx[r, 0] = -1
        idx[r, 1] = -1
        for j in range(n_cols):  # selected whatever the values, but NaN is still an error
            if (not has_mask or mask[r, j]) and x[r, j] - x[r, j] != 0.0:
                idx[r, 0] = -2
                break
        return
    found = False
    hi_slot = -1
    if kr + 1 <= _SMALL and n < _SAMPLE_MIN:
        finite, hi, lo, hi_slot, lo_slot = _small_k_boundary(
            x[r], mask[r if has_mask else 0], has_mask, kr, vals, ids, scratch, slots
        )
        if not finite:
            idx[r, 0] = -2
            return
        found = True
    elif n >= _SAMPLE_MIN:
        found, hi, lo, hi_slot, lo_slot = _sampled_boundary(
            x[r], mask[r if has_mask else 0], has_mask, n, kr, vals, ids, scratch
        )
    if hi_slot == -2:  # a non-finite valid score: reported by the caller
        idx[r, 0] = -2
        return
    if not found:
        n = 0
        finite = True
        for j in range(n_cols):
            if not has_mask or mask[r, j]:
                v = x[r, j]
                finite &= v - v == 0.0
                vals[n] = v
                ids[n] = j
                n += 1
        if not finite:
            idx[r, 0] = -2
            return
        scratch[:n] = vals[:n]
        hi, lo = _boundary_values(scratch, n, kr)
        hi_slot, lo_slot = _find_slots(vals, ids, n, hi, lo)
    theta[r] = 0.5 * (hi + lo)
    idx[r, 0] = hi_slot  # π(k)
    idx[r, 1] = lo_slot  # π(k+1)


@numba.njit(cache=True, nogil=True)
def _threshold_serial(x, mask, has_mask, k, theta, idx, tau, z, want_z):  # pragma: no cover
    vals = np.empty(x.shape[1], x.dtype)
    ids = np.empty(x.shape[1], np.int64)
    scratch = np.empty(x.shape[1], x.dtype)
    slots = np.empty(_SMALL, np.int64)
    _rows(
        x, mask, has_mask, k, theta, idx, 0, x.shape[0], vals, ids, scratch, slots, tau, z, want_z
    )


@numba.njit(cache=True, nogil=True, parallel=True)
def _threshold_parallel(
    x, mask, has_mask, k, theta, idx, n_chunks, tau, z, want_z
):  # pragma: no cover
    rows = x.shape[0]
    for c in numba.prange(n_chunks):
        vals = np.empty(x.shape[1], x.dtype)  # scratch buffers per chunk, not per row
        ids = np.empty(x.shape[1], np.int64)
        scratch = np.empty(x.shape[1], x.dtype)
        slots = np.empty(_SMALL, np.int64)
        start = c * rows // n_chunks
        stop = (c + 1) * rows // n_chunks
        _rows(
            x, mask, has_mask, k, theta, idx, start, stop, vals, ids, scratch, slots, tau, z, want_z
        )


def threshold_numba(
    x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, tau: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (R, N) float32/64 CPU, k (R,) -> θ (R,), idx (R, 2) [π(k), π(k+1)] (−1 if k >= n), and
    with tau the logits z = (x − θ) / τ (R, N) (−∞ at masked slots, +∞ at the valid slots of rows
    with k >= n), formed while each row is still in cache; else None."""
    xn = x.detach().contiguous().numpy()
    kn = k.contiguous().numpy()
    has_mask = mask is not None
    # The mask as uint8: numba's loads of bool arrays defeat its branch-free selects (~3× slower).
    mn = mask.contiguous().numpy().view(np.uint8) if has_mask else np.ones((1, 1), np.uint8)
    theta = np.empty(xn.shape[0], xn.dtype)
    idx = np.empty((xn.shape[0], 2), np.int64)
    want_z = tau is not None
    z = np.empty(xn.shape if want_z else (1, 1), xn.dtype)
    tau_x = xn.dtype.type(tau if want_z else 1.0)  # torch divides in x's dtype too
    threads = numba.get_num_threads() if xn.size >= PARALLEL_MIN_ELEMENTS else 1
    if threads > 1:
        chunks = min(threads * 4, xn.shape[0])
        _threshold_parallel(xn, mn, has_mask, kn, theta, idx, chunks, tau_x, z, want_z)
    else:
        _threshold_serial(xn, mn, has_mask, kn, theta, idx, tau_x, z, want_z)
    if (idx[:, 0] == -2).any():
        check_finite(x, mask)  # raises, naming the first row with a NaN/inf valid score
    return torch.from_numpy(theta), torch.from_numpy(idx), torch.from_numpy(z) if want_z else None
