"""DFTopK: differentiable fast top-k (Zhu et al., "Differentiable Fast Top-K Selection for
Large-Scale Recommendation", arXiv 2510.11472), SPEC.md §2.1.

Notation: x ∈ R^N one row's scores over its valid slots V, x_[1] ≥ … ≥ x_[n] their order
statistics (n = |V|), π(r) the slot holding x_[r], τ > 0 the temperature.

    θ_k(x) = (x_[k] + x_[k+1]) / 2,     z_i = (x_i − θ_k(x)) / τ,     f_k(x)_i = σ(z_i)

    ∂z_i/∂x_j = (δ_ij − ½·1[j = π(k)] − ½·1[j = π(k+1)]) / τ

so the vector-Jacobian product is g/τ everywhere, with −½Σg/τ added at each of the two boundary
slots ("localized gradients"). Σ f = k is not enforced. O(N) per row.

Implementation:
- One selection per row, not two: v = x_[k+1] by quickselect, then x_[k] = min of the k slots
  the partition put in front of v (they are exactly the k largest). On CPU this is a numba kernel
  (three-way-partition quickselect, O(N) expected, parallel over rows for large batches); on
  other devices one ``torch.topk(max k + 1)`` (multi-block on CUDA) or ``torch.kthvalue`` when
  k is the same in every row — ``select="auto"`` chooses by device (see ``_AUTO_SELECT``).
- A custom ``autograd.Function`` whose backward is the closed form above. It saves only the two
  boundary indices per row (int64, −1 for rows with k >= n) and the mask when one is given.
- Masked slots never enter the selection; z = −∞ there (f = 0, no gradient). A row whose k is at
  least its number of valid slots selects all of them: θ = −∞, z = +∞, f = 1, zero gradient.
- Ties at the k/k+1 boundary give θ = the tied value and f = ½ at the tied slots; π(k) and
  π(k+1) are then two distinct tied slots, on every selection path.

Deviations from the authors' code (read, not copied): they call a k-th-order-statistic routine
twice and let autograd differentiate through it; they have no masks (padded slots take part in
the selection) and no per-row k.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from raytopk.ops._registry import register
from raytopk.ops._validate import check_finite, check_param, prepare

__all__ = ["DEFAULT_TAU", "dftopk", "dftopk_logits", "dftopk_threshold", "step_bytes", "warmup"]

# τ of the RecFlow protocol (SPEC.md §2.1; scores grow large under Adam, τ sets the margin
# scale). The one default of every public function taking τ; the registry reads it from there.
DEFAULT_TAU = 500.0

# Selection primitive per device type when select="auto". CPU: the numba kernel (one selection,
# measured faster than torch.topk and torch.kthvalue at every benchmarked size, see README).
# Other devices: torch.topk(max k + 1), a multi-block radix select on CUDA, where kthvalue runs
# one block per row. The CUDA choice is by that design, not yet measured here (no GPU was
# available to this project): `jobs/bench_ops.py --device cuda --select-compare` measures it.
_AUTO_SELECT = {"cpu": "numba"}
_DEFAULT_SELECT = "topk"
_SELECTS = ("auto", "numba", "topk", "kthvalue")
_PARALLEL_MIN_ELEMENTS = 1 << 15  # below this, numba's thread start-up costs more than it saves


# ---- CPU kernel ------------------------------------------------------------------------------


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


def _threshold_numba(
    x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, N) float32/64 CPU, k (R,) -> θ (R,), idx (R, 2) [π(k), π(k+1)] (−1 if k >= n)."""
    xn = x.detach().contiguous().numpy()
    kn = k.contiguous().numpy()
    has_mask = mask is not None
    mn = mask.contiguous().numpy() if has_mask else np.ones((1, 1), np.bool_)
    theta = np.empty(xn.shape[0], xn.dtype)
    idx = np.empty((xn.shape[0], 2), np.int64)
    threads = numba.get_num_threads() if xn.size >= _PARALLEL_MIN_ELEMENTS else 1
    if threads > 1:
        _threshold_parallel(xn, mn, has_mask, kn, theta, idx, min(threads * 4, xn.shape[0]))
    else:
        _threshold_serial(xn, mn, has_mask, kn, theta, idx)
    if (idx[:, 0] == -2).any():
        check_finite(x, mask)  # raises, naming the first row with a NaN/inf valid score
    return torch.from_numpy(theta), torch.from_numpy(idx)


# ---- torch selection (any device) ------------------------------------------------------------


def _threshold_torch(
    x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, select: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as _threshold_numba with torch primitives (CUDA and other devices)."""
    rows, size = x.shape
    xm = x if mask is None else x.masked_fill(~mask, float("-inf"))
    n = torch.full_like(k, size) if mask is None else mask.sum(-1)
    decided = k >= n  # (R,) every valid slot is selected
    kk = torch.where(decided, torch.ones_like(k), k)  # any in-range k for those rows
    if rows == 0 or bool(decided.all()):
        return x.new_full((rows,), float("-inf")), k.new_full((rows, 2), -1)
    if select == "kthvalue" and bool((kk == kk[0]).all()):
        # v = x_[k+1] = the (N − k)-th smallest; x_[k] = min{x_i > v} (or v when tied).
        k0 = int(kk[0])
        v, lo_slot = torch.kthvalue(xm, size - k0, dim=-1)  # (R,)
        above = xm > v.unsqueeze(-1)
        hi_val, hi_slot = torch.where(above, xm, float("inf")).min(-1)
        tied = above.sum(-1) < k0
        hi_val = torch.where(tied, v, hi_val)
        # At a tie π(k) and π(k+1) are two distinct slots holding v (each absorbs −½Σg):
        # take the first slot equal to v other than the one kthvalue returned.
        other = (xm == v.unsqueeze(-1)).scatter(-1, lo_slot.unsqueeze(-1), False)  # (R, N)
        hi_slot = torch.where(tied, other.to(torch.uint8).argmax(-1), hi_slot)
    else:
        top = min(int(kk.max()) + 1, size)
        vals, slots = torch.topk(xm, top, dim=-1, sorted=True)  # (R, top) descending
        pos = torch.stack([kk - 1, kk], -1).clamp_max(top - 1)  # (R, 2) ranks k, k+1 (0-based)
        val2 = vals.gather(-1, pos)
        slot2 = slots.gather(-1, pos)
        hi_val, lo_val = val2.unbind(-1)
        hi_slot, lo_slot = slot2.unbind(-1)
        v = lo_val
    theta = torch.where(decided, float("-inf"), 0.5 * (hi_val + v))
    idx = torch.stack([hi_slot, lo_slot], -1).masked_fill(decided.unsqueeze(-1), -1)
    return theta, idx


def _threshold(
    x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, select: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if select == "auto":
        select = _AUTO_SELECT.get(x.device.type, _DEFAULT_SELECT)
    if select == "numba":
        if x.device.type != "cpu":
            raise ValueError(f"'select'='numba' needs a CPU tensor but scores are on {x.device}")
        return _threshold_numba(x, k, mask)
    return _threshold_torch(x, k, mask, select)


# ---- autograd ----------------------------------------------------------------------------------


class _DFTopKLogits(torch.autograd.Function):
    """z = (x − θ_k(x)) / τ on (R, N) rows, with the localized closed-form backward."""

    @staticmethod
    def forward(ctx, x, k, mask, tau, select):  # type: ignore[override]
        theta, idx = _threshold(x, k, mask, select)
        theta = theta.to(x.device)
        idx = idx.to(x.device)
        z = (x - theta.unsqueeze(-1)) / tau  # decided rows: θ = −∞ → z = +∞
        if mask is not None:
            z = z.masked_fill(~mask, float("-inf"))
        ctx.tau = tau
        ctx.save_for_backward(idx, mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return z

    @staticmethod
    def backward(ctx, grad_z):  # type: ignore[override]
        idx, mask = ctx.saved_tensors
        decided = idx[:, 0] < 0  # (R,)
        g = grad_z
        if ctx.has_mask:
            g = g.masked_fill(~mask, 0.0)
        g = g.masked_fill(decided.unsqueeze(-1), 0.0) / ctx.tau  # (R, N)
        # Each boundary slot absorbs −½ of the row's total upstream gradient.
        half = (-0.5 * g.sum(-1, keepdim=True)).expand(-1, 2)  # (R, 2)
        grad_x = g.scatter_add(-1, idx.clamp_min(0), half.masked_fill(decided.unsqueeze(-1), 0))
        return grad_x, None, None, None, None


def _as_compute(x: torch.Tensor) -> torch.Tensor:
    # Selection is exact in any dtype, but z is formed in at least float32.
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _check_select(select: object) -> str:
    if select not in _SELECTS:
        raise ValueError(f"'select' should be one of {list(_SELECTS)} but got {select!r}")
    return select  # type: ignore[return-value]


def dftopk_logits(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    tau: float = DEFAULT_TAU,
    mask: torch.Tensor | None = None,
    *,
    select: str = "auto",
) -> torch.Tensor:
    """DFTopK logits z = (x − θ_k(x)) / τ, for BCE-with-logits losses (σ(z) is the membership).

    Args:
        scores: (..., N) float scores.
        k: int, or LongTensor of shape scores.shape[:-1] (per-row k).
        tau: temperature τ > 0.
        mask: (..., N) bool, True = valid, or None.
        select: selection primitive, "auto" (by device), "numba" (CPU), "topk" or "kthvalue".
    Returns (..., N) logits (float32 for 16-bit inputs): −∞ at masked slots, +∞ at the valid
    slots of rows whose k is at least their number of valid slots.
    """
    select = _check_select(select)
    if select == "auto" and isinstance(scores, torch.Tensor):
        select = _AUTO_SELECT.get(scores.device.type, _DEFAULT_SELECT)
    # The numba kernel checks finiteness in its own pass over the scores.
    x, k_rows, mask_t = prepare(scores, k, mask, finite=select != "numba")
    tau_f = check_param("tau", tau)
    shape = x.shape
    x2 = _as_compute(x).reshape(-1, shape[-1])  # (R, N)
    m2 = mask_t.reshape(-1, shape[-1]) if mask_t is not None else None
    z = _DFTopKLogits.apply(x2, k_rows.reshape(-1), m2, tau_f, select)
    return z.reshape(shape)


def dftopk_threshold(
    scores: torch.Tensor, k: int | torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """θ_k per row (..., ) without gradient: midpoint of x_[k] and x_[k+1] (−∞ where k >= n)."""
    x, k_rows, mask_t = prepare(scores, k, mask)
    shape = x.shape
    m2 = mask_t.reshape(-1, shape[-1]) if mask_t is not None else None
    with torch.no_grad():
        theta, _ = _threshold(_as_compute(x).reshape(-1, shape[-1]), k_rows.reshape(-1), m2, "auto")
    return theta.to(x.device).reshape(shape[:-1])


def step_bytes(batch: int, n: int, itemsize: int = 4) -> int:
    """Peak bytes of one stage's training forward+backward (logits, the BCE-with-logits stage
    loss and their gradients): about ten (B, N) tensors. The selection keeps only two int64
    indices per row; the numba kernel's O(N) scratch per thread is not counted."""
    return 10 * batch * n * itemsize


@register(
    "dftopk",
    param="tau",
    hard_limit=0.05,
    sums_to_k=False,
    complexity="O(N)",
    step_bytes=step_bytes,
)
def dftopk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tau: float = DEFAULT_TAU,
    select: str = "auto",
) -> torch.Tensor:
    """DFTopK soft top-k membership σ((x − θ_k(x)) / τ), SPEC.md §2.1.

    scores (..., N); k an int or a LongTensor of shape scores.shape[:-1]; mask (..., N) bool or
    None. Returns (..., N) in [0, 1] in the dtype of scores: 0 at masked slots, 1 at the valid
    slots of rows with k >= n.
    """
    return torch.sigmoid(dftopk_logits(scores, k, tau, mask, select=select)).to(scores.dtype)


def warmup() -> None:
    """Compile the CPU kernels for float32 and float64 now (numba compiles on first use, a few
    seconds per dtype without a cache): call before timing or under a time budget."""
    for dtype in (torch.float32, torch.float64):
        x = torch.arange(_PARALLEL_MIN_ELEMENTS, dtype=dtype).reshape(-1, 64)
        dftopk_logits(x, 3)  # the parallel kernel
        dftopk_logits(x[:2], 3, mask=torch.ones(2, 64, dtype=torch.bool))  # the serial one
