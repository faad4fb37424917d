"""DFTopK's CPU selection kernel (numba): θ_k and the two boundary slots π(k), π(k+1) per row with
one selection (docs/protocol.md §2.1; the operator and its notation are in raytopk/ops/dftopk.py).

Per row: v = x_[k+1] by a three-way-partition quickselect (O(N) expected; insertion for small
rank sets; a sampled Floyd-Rivest-style filter first for long rows), then x_[k] = the minimum of
the k slots the partition put in front of v. Rows run in parallel for large batches. A row with
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
def _rows(x, mask, has_mask, k, theta, idx, start, stop, vals, ids, scratch):  # pragma: no cover
    """θ and the boundary slots [π(k), π(k+1)] for rows start..stop−1 (−1 where k >= n;
    idx[r, 0] = −2 where a valid score is NaN or ±inf: the kernel doubles as the finiteness
    check, saving the separate isfinite pass)."""
    n_cols = x.shape[1]
    for r in range(start, stop):
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
            continue
        found = False
        hi_slot = -1
        if n >= _SAMPLE_MIN:
            found, hi, lo, hi_slot, lo_slot = _sampled_boundary(
                x[r], mask[r if has_mask else 0], has_mask, n, kr, vals, ids, scratch
            )
        if hi_slot == -2:  # a non-finite valid score: reported by the caller
            idx[r, 0] = -2
            continue
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
                continue
            scratch[:n] = vals[:n]
            hi, lo = _boundary_values(scratch, n, kr)
            hi_slot, lo_slot = _find_slots(vals, ids, n, hi, lo)
        theta[r] = 0.5 * (hi + lo)
        idx[r, 0] = hi_slot  # π(k)
        idx[r, 1] = lo_slot  # π(k+1)


@numba.njit(cache=True, nogil=True)
def _threshold_serial(x, mask, has_mask, k, theta, idx):  # pragma: no cover - compiled
    vals = np.empty(x.shape[1], x.dtype)
    ids = np.empty(x.shape[1], np.int64)
    scratch = np.empty(x.shape[1], x.dtype)
    _rows(x, mask, has_mask, k, theta, idx, 0, x.shape[0], vals, ids, scratch)


@numba.njit(cache=True, nogil=True, parallel=True)
def _threshold_parallel(x, mask, has_mask, k, theta, idx, n_chunks):  # pragma: no cover
    rows = x.shape[0]
    for c in numba.prange(n_chunks):
        vals = np.empty(x.shape[1], x.dtype)  # scratch buffers per chunk, not per row
        ids = np.empty(x.shape[1], np.int64)
        scratch = np.empty(x.shape[1], x.dtype)
        start = c * rows // n_chunks
        stop = (c + 1) * rows // n_chunks
        _rows(x, mask, has_mask, k, theta, idx, start, stop, vals, ids, scratch)


def threshold_numba(
    x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, N) float32/64 CPU, k (R,) -> θ (R,), idx (R, 2) [π(k), π(k+1)] (−1 if k >= n)."""
    xn = x.detach().contiguous().numpy()
    kn = k.contiguous().numpy()
    has_mask = mask is not None
    mn = mask.contiguous().numpy() if has_mask else np.ones((1, 1), np.bool_)
    theta = np.empty(xn.shape[0], xn.dtype)
    idx = np.empty((xn.shape[0], 2), np.int64)
    threads = numba.get_num_threads() if xn.size >= PARALLEL_MIN_ELEMENTS else 1
    if threads > 1:
        _threshold_parallel(xn, mn, has_mask, kn, theta, idx, min(threads * 4, xn.shape[0]))
    else:
        _threshold_serial(xn, mn, has_mask, kn, theta, idx)
    if (idx[:, 0] == -2).any():
        check_finite(x, mask)  # raises, naming the first row with a NaN/inf valid score
    return torch.from_numpy(theta), torch.from_numpy(idx)
