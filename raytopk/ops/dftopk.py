"""DFTopK: differentiable fast top-k (Zhu et al., "Differentiable Fast Top-K Selection for
Large-Scale Recommendation", arXiv 2510.11472), docs/protocol.md §2.1.

Notation: x ∈ R^N one row's scores over its valid slots V, x_[1] ≥ … ≥ x_[n] their order
statistics (n = |V|), π(r) the slot holding x_[r], τ > 0 the temperature.

    θ_k(x) = (x_[k] + x_[k+1]) / 2,     z_i = (x_i − θ_k(x)) / τ,     f_k(x)_i = σ(z_i)

    ∂z_i/∂x_j = (δ_ij − ½·1[j = π(k)] − ½·1[j = π(k+1)]) / τ

so the vector-Jacobian product is g/τ everywhere, with −½Σg/τ added at each of the two boundary
slots ("localized gradients"). Σ f = k is not enforced. O(N) per row.

Implementation:
- One selection per row, not two: v = x_[k+1] by quickselect, then x_[k] = min of the k slots
  the partition put in front of v (they are exactly the k largest). On CPU this is a numba kernel
  (three-way-partition quickselect, O(N) expected; for k + 1 <= 16 a group-maxima bound, one
  branch-free filtering pass and insertion instead; parallel over rows for large batches); on
  other devices torch primitives: ``topk`` (``torch.topk(max k + 1)``, sorted), and for a k
  that is the same in every row ``topk_unsorted`` (``torch.topk(k + 1, sorted=False)`` and two
  min passes over those k + 1: no sort of the top set, which matters at large k) or
  ``kthvalue`` (``torch.kthvalue`` and a masked min); ``sort`` (a full row sort, what small rows
  may do fastest on a GPU). A uniform-k primitive falls back to ``topk`` for per-row k.
  ``select="auto"`` chooses by device (see ``_AUTO_SELECT``).
- A custom ``autograd.Function`` whose backward is the closed form above, in place on one (R, N)
  buffer. It saves only the two boundary indices per row (int64, −1 for rows with k >= n) and the
  mask when one is given.
- Masked slots never enter the selection; z = −∞ there (f = 0, no gradient). A row whose k is at
  least its number of valid slots selects all of them: θ = −∞, z = +∞, f = 1, zero gradient.
- Ties at the k/k+1 boundary give θ = the tied value and f = ½ at the tied slots; π(k) and
  π(k+1) are then two distinct tied slots, on every selection path.

Deviations from the authors' code (read, not copied): they call a k-th-order-statistic routine
twice and let autograd differentiate through it; they have no masks (padded slots take part in
the selection) and no per-row k.
"""

from __future__ import annotations

import torch

from raytopk.ops._dftopk_cpu import PARALLEL_MIN_ELEMENTS, threshold_numba
from raytopk.ops._registry import register
from raytopk.ops._validate import check_param, prepare

__all__ = [
    "DEFAULT_TAU",
    "TORCH_SELECTS",
    "dftopk",
    "dftopk_logits",
    "dftopk_threshold",
    "step_bytes",
    "warmup",
]

# τ of the RecFlow protocol (docs/protocol.md §2.1; scores grow large under Adam, τ sets the margin
# scale). The one default of every public function taking τ; the registry reads it from there.
DEFAULT_TAU = 500.0

# Selection primitive per device type when select="auto". CPU: the numba kernel (one selection,
# measured faster than torch.topk and torch.kthvalue at every benchmarked size, see README).
# Other devices: torch.topk(max k + 1), a multi-block radix select on CUDA, where kthvalue runs
# one block per row. The CUDA entry is by that design, NOT yet measured (no GPU was available to
# this project). To decide it: `python jobs/gpu_check.py --device cuda --out DIR` (or
# `jobs/bench_ops.py --device cuda --select-compare`) times every select at the benchmark's
# shapes; set _AUTO_SELECT["cuda"] to the JSON's selection.recommended (fastest by geometric
# mean of forward+backward over the shapes) and quote its table in this comment.
_AUTO_SELECT = {"cpu": "numba"}
_DEFAULT_SELECT = "topk"
_SELECTS = ("auto", "numba", "topk", "topk_unsorted", "kthvalue", "sort")
TORCH_SELECTS = ("topk", "topk_unsorted", "kthvalue", "sort")  # any device


# ---- torch selection (any device) ------------------------------------------------------------


def _threshold_torch(
    x: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, select: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as threshold_numba with torch primitives (CUDA and other devices)."""
    rows, size = x.shape
    xm = x if mask is None else x.masked_fill(~mask, float("-inf"))
    n = torch.full_like(k, size) if mask is None else mask.sum(-1)
    decided = k >= n  # (R,) every valid slot is selected
    kk = torch.where(decided, torch.ones_like(k), k)  # any in-range k for those rows
    if rows == 0 or bool(decided.all()):
        return x.new_full((rows,), float("-inf")), k.new_full((rows, 2), -1)
    uniform = select in ("kthvalue", "topk_unsorted") and bool((kk == kk[0]).all())
    if select == "kthvalue" and uniform:
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
    elif select == "topk_unsorted" and uniform:
        # The k + 1 largest in any order (k < n: all valid); x_[k+1] is their min, x_[k] the
        # min of the other k. At a tie the two mins sit at two distinct slots holding v.
        vals, slots = torch.topk(xm, int(kk[0]) + 1, dim=-1, sorted=False)  # (R, k + 1)
        v, at = vals.min(-1)  # (R,)
        hi_val, at_hi = vals.scatter(-1, at.unsqueeze(-1), float("inf")).min(-1)
        lo_slot = slots.gather(-1, at.unsqueeze(-1)).squeeze(-1)
        hi_slot = slots.gather(-1, at_hi.unsqueeze(-1)).squeeze(-1)
    else:
        if select == "sort":
            top = size
            vals, slots = torch.sort(xm, dim=-1, descending=True)  # (R, N)
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
        return threshold_numba(x, k, mask)[:2]
    return _threshold_torch(x, k, mask, select)


# ---- autograd ----------------------------------------------------------------------------------


class _DFTopKLogits(torch.autograd.Function):
    """z = (x − θ_k(x)) / τ on (R, N) rows, with the localized closed-form backward."""

    @staticmethod
    def forward(ctx, x, k, mask, tau, select):  # type: ignore[override]
        if select == "numba" and x.device.type == "cpu":  # dftopk_logits resolved "auto"
            _, idx, z = threshold_numba(x, k, mask, tau)  # z formed in the kernel, same bits
        else:
            theta, idx = _threshold(x, k, mask, select)
            theta = theta.to(x.device)
            idx = idx.to(x.device)
            z = (x - theta.unsqueeze(-1)).div_(tau)  # decided rows: θ = −∞ → z = +∞
            if mask is not None:
                z.masked_fill_(~mask, float("-inf"))
        ctx.tau = tau
        ctx.save_for_backward(idx, mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return z

    @staticmethod
    def backward(ctx, grad_z):  # type: ignore[override]
        idx, mask = ctx.saved_tensors
        decided = idx[:, 0] < 0  # (R,)
        # One (R, N) buffer, updated in place (the same values as the out-of-place form).
        g = grad_z / ctx.tau  # (R, N)
        if ctx.has_mask:
            g.masked_fill_(~mask, 0.0)
        any_decided = bool(decided.any())
        if any_decided:
            g.masked_fill_(decided.unsqueeze(-1), 0.0)
        # Each boundary slot absorbs −½ of the row's total upstream gradient.
        half = (-0.5 * g.sum(-1, keepdim=True)).expand(-1, 2)  # (R, 2)
        if any_decided:
            half = half.masked_fill(decided.unsqueeze(-1), 0)
        return g.scatter_add_(-1, idx.clamp_min(0), half), None, None, None, None


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
        select: selection primitive: "auto" (by device), "numba" (CPU), or one of
            TORCH_SELECTS ("topk", "topk_unsorted", "kthvalue", "sort"; any device).
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
    bf16=True,
    bf16_reason="selection exact in any dtype; logits formed in float32",
    logits=lambda scores, k, mask=None, *, tau=DEFAULT_TAU: dftopk_logits(scores, k, tau, mask),
    default_form="bce",
)
def dftopk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tau: float = DEFAULT_TAU,
    select: str = "auto",
) -> torch.Tensor:
    """DFTopK soft top-k membership σ((x − θ_k(x)) / τ), docs/protocol.md §2.1.

    scores (..., N); k an int or a LongTensor of shape scores.shape[:-1]; mask (..., N) bool or
    None. Returns (..., N) in [0, 1] in the dtype of scores: 0 at masked slots, 1 at the valid
    slots of rows with k >= n.
    """
    return torch.sigmoid(dftopk_logits(scores, k, tau, mask, select=select)).to(scores.dtype)


def warmup() -> None:
    """Compile the CPU kernels for float32 and float64 now (numba compiles on first use, a few
    seconds per dtype without a cache): call before timing or under a time budget."""
    for dtype in (torch.float32, torch.float64):
        x = torch.arange(PARALLEL_MIN_ELEMENTS, dtype=dtype).reshape(-1, 64)
        dftopk_logits(x, 3)  # the parallel kernel
        dftopk_logits(x[:2], 3, mask=torch.ones(2, 64, dtype=torch.bool))  # the serial one
