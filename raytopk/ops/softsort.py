"""SoftSort soft permutation (Prillo, Eisenschlos, "SoftSort: A Continuous Relaxation for the
argsort Operator", ICML 2020, arXiv 2006.16038), as a soft top-k membership.

Notation: x ∈ R^N one row's scores, V its valid slots, n = |V|, x̂ = the valid scores sorted
descending (x̂_1 ≥ … ≥ x̂_n), τ > 0 the temperature, d(a, b) = |a − b| (the paper's choice).

    P̂[r, j] = softmax_{j∈V}( −|x̂_r − x_j| / τ )                   (rows r > n and masked j: 0)
    u_j     = Σ_{r≤k} P̂[r, j] / Σ_r P̂[r, j]                         (soft top-k membership)

Each row of P̂ sums to 1; columns do not. The sort is a constant permutation of the inputs, so
gradients flow through x̂ as well as x. As τ → 0 with distinct scores, P̂ tends to the sorting
permutation matrix and u to the hard top-k mask. O(N²) time and memory per row.

Deviations from the port in the DFTopK/LCRON code (read, not copied):
- masks: padded slots are absent — x̂ sorts the valid scores only, the softmax runs over valid
  columns, ranks r > n are zero (the port sorts and softmaxes over padded slots too);
- bfloat16/float16 inputs are computed in float32;
- the membership (u above) is part of the operator; default τ = 50 (RecFlow protocol,
  docs/protocol.md §2.4; the
  port's SoftSortNet config defaults to τ = 1).
"""

from __future__ import annotations

import torch

from raytopk.ops._permutation import (
    compute_dtype,
    masked_softmax,
    prepare_permutation,
    rank_mask,
    run_permutation_op,
    valid_counts,
)
from raytopk.ops._registry import register

__all__ = ["DEFAULT_TAU", "soft_permutation", "softsort", "step_bytes"]

# τ of the RecFlow protocol (docs/protocol.md §2.4): the one default of every public
# function taking τ.
DEFAULT_TAU = 50.0


def _soft_permutation(x: torch.Tensor, tau: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Unchecked kernel on a float32/float64 tensor (..., N) -> (..., N, N)."""
    if mask is None:
        x_sorted = torch.sort(x, dim=-1, descending=True).values  # (..., N) x̂
        return torch.softmax((x_sorted.unsqueeze(-1) - x.unsqueeze(-2)).abs() / -tau, dim=-1)
    size = x.shape[-1]
    ranks = rank_mask(valid_counts(mask, x), size)  # (..., N) r < n
    # Padding may hold inf/NaN: fill it before any arithmetic so neither pass sees inf − inf.
    x = x.masked_fill(~mask, 0.0)
    # Masked slots sort last (−inf); the ranks they land on (r >= n) are then reset to 0 so that
    # no infinity reaches the differences below.
    x_sorted = torch.sort(x.masked_fill(~mask, float("-inf")), dim=-1, descending=True).values
    x_sorted = x_sorted.masked_fill(~ranks, 0.0)  # (..., N) x̂, 0 past rank n
    logits = (x_sorted.unsqueeze(-1) - x.unsqueeze(-2)).abs() / -tau  # (..., N, N)
    return masked_softmax(logits, mask).masked_fill(~ranks.unsqueeze(-1), 0.0)


def soft_permutation(
    scores: torch.Tensor, tau: float = DEFAULT_TAU, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SoftSort P̂ of shape (..., N, N): rows = ranks (descending), columns = items.

    Args:
        scores: (..., N) float scores.
        tau: temperature τ > 0.
        mask: (..., N) bool, True = valid, or None. Masked columns and ranks r >= n are 0.
    Returns the relaxation in the dtype of scores (computed in float32 for 16-bit inputs).
    """
    x, tau_f, mask_t = prepare_permutation(scores, "tau", tau, mask)
    return _soft_permutation(x.to(compute_dtype(x.dtype)), tau_f, mask_t).to(x.dtype)


def step_bytes(batch: int, n: int, itemsize: int = 4) -> int:
    """Peak bytes of one stage's training forward+backward through the LCRON loss:
    |x̂_r − x_j| and the masked logits, P̂ and the softmax's saved output, the LCRON label
    relaxation Ŷ and the gradient of P̂: about six (B, N, N) tensors at the peak."""
    return 6 * batch * n * n * itemsize


@register(
    "softsort",
    param="tau",
    hard_limit=1e-3,
    sums_to_k=False,
    permutation=True,
    complexity="O(N^2)",
    step_bytes=step_bytes,
    bf16=True,
    bf16_reason="the N x N relaxation is computed in float32 (_permutation.compute_dtype)",
    label_param=1e-4,  # the LCRON loss's label relaxation (raytopk.losses.lcron)
)
def softsort(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tau: float = DEFAULT_TAU,
) -> torch.Tensor:
    """Soft top-k membership u_j = Σ_{r<k} P̂[r,j] / Σ_r P̂[r,j] from SoftSort's P̂.

    scores (..., N); k an int or a LongTensor of shape scores.shape[:-1]; mask (..., N) bool or
    None. Returns (..., N) in [0, 1], 0 at masked slots, 1 at valid slots of rows with k >= n.
    """
    return run_permutation_op(_soft_permutation, scores, k, mask, "tau", tau)
