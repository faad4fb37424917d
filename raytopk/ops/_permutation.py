"""Helpers shared by the permutation relaxations (neuralsort, softsort, diffsort;
docs/protocol.md §2.4).

Notation: N = slots per row, V = valid slots of a row, n = |V|, P̂ ∈ R^{N×N} a row's soft
permutation with rows = ranks (descending, 0-based r) and columns = items. A masked slot is
treated as absent: its column and the ranks r >= n are exactly 0, so P̂ restricted to (r < n, V)
is the relaxation of the n valid scores alone.

Soft top-k membership from a soft permutation (the LCRON numerator/denominator,
docs/protocol.md §3.3):

    u_j = Σ_{r<k} P̂[r, j] / Σ_r P̂[r, j]        (u_j = 1 when k >= n, u_j = 0 for masked j)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raytopk.nn import masked_softmax  # shared with raytopk.models.din; re-exported for the ops
from raytopk.ops._validate import check_finite, check_mask, check_param, check_scores, prepare

__all__ = [
    "compute_dtype",
    "valid_counts",
    "rank_mask",
    "masked_softmax",
    "compact_valid",
    "membership_from_permutation",
    "prepare_permutation",
    "run_permutation_op",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float (bfloat16, float16, float32) runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_counts(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """n per row, LongTensor of shape x.shape[:-1]."""
    if mask is None:
        return torch.full(x.shape[:-1], x.shape[-1], dtype=torch.long, device=x.device)
    return mask.sum(-1)


def rank_mask(n: torch.Tensor, size: int) -> torch.Tensor:
    """(..., size) bool: rank r (0-based) exists in a row with n valid items, i.e. r < n."""
    return torch.arange(size, device=n.device) < n.unsqueeze(-1)


def compact_valid(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse): ``x.gather(-1, order)`` puts each row's valid slots first, in slot order
    (stable), and ``y.gather(-1, inverse)`` undoes it."""
    # A stable sort of the 0/1 key "is masked" keeps the valid slots' relative order.
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    inverse = torch.argsort(order, dim=-1)
    return order, inverse


def membership_from_permutation(
    perm: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """u_j = Σ_{r<k} P̂[r,j] / Σ_r P̂[r,j]; k a LongTensor of shape perm.shape[:-2].

    Exactly 0 at masked slots; exactly 1 at every valid slot of a row with k >= n.
    """
    size = perm.shape[-1]
    top_ranks = rank_mask(k, size).to(perm.dtype)  # (..., N) 1 for ranks r < k
    # Batched mat-vec products: no (..., N, N) temporary beyond P̂ itself.
    top = torch.einsum("...rj,...r->...j", perm, top_ranks)  # (..., N)
    total = perm.sum(-2)  # (..., N)
    valid = total > 0 if mask is None else mask & (total > 0)
    # total > 0 at every valid column in exact arithmetic; the guard keeps 0/0 out of both passes.
    u = torch.where(valid, top / torch.where(valid, total, torch.ones_like(total)), 0.0)
    u = u.clamp(0.0, 1.0)  # rounding may put top/total one ulp above 1
    n = valid_counts(mask, perm[..., 0, :])
    everything = (k >= n).unsqueeze(-1)
    if mask is not None:
        everything = everything & mask
    else:
        everything = everything.expand_as(u)
    return torch.where(everything, torch.ones_like(u), u)


def prepare_permutation(
    scores: object, param_name: str, value: object, mask: object
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """Validate the arguments of ``soft_permutation(scores, <param>, mask)``."""
    scores_t = check_scores(scores)
    mask_t = check_mask(mask, scores_t)
    check_finite(scores_t, mask_t)
    return scores_t, check_param(param_name, value), mask_t


def run_permutation_op(
    soft_perm: Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor],
    scores: object,
    k: object,
    mask: object,
    param_name: str,
    value: object,
) -> torch.Tensor:
    """The registered op: validate, relax in float32/float64, membership, back to input dtype.

    ``soft_perm(x, value, mask)`` is the module's unchecked kernel on validated tensors.
    """
    scores_t, k_rows, mask_t = prepare(scores, k, mask)
    value_f = check_param(param_name, value)
    x = scores_t.to(compute_dtype(scores_t.dtype))
    perm = soft_perm(x, value_f, mask_t)  # (..., N, N)
    return membership_from_permutation(perm, k_rows, mask_t).to(scores_t.dtype)
