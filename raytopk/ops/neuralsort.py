"""NeuralSort soft permutation (Grover, Wang, Zweig, Ermon, "Stochastic Optimization of Sorting
Networks via Continuous Relaxations", ICLR 2019, arXiv 1903.08850), as a soft top-k membership.

Notation: x ∈ R^N one row's scores, V its valid slots, n = |V|, ranks r = 1..n (descending),
A_j = Σ_{l∈V} |x_j − x_l|, τ > 0 the temperature.

    P̂[r, j] = softmax_{j∈V}( ((n + 1 − 2r)·x_j − A_j) / τ )        (rows r > n and masked j: 0)
    u_j     = Σ_{r≤k} P̂[r, j] / Σ_r P̂[r, j]                         (soft top-k membership)

Each row of P̂ sums to 1 (a distribution over items); columns do not (P̂ is unimodal row-
stochastic, not doubly stochastic). As τ → 0 with distinct scores, P̂ tends to the sorting
permutation matrix and u to the hard top-k mask. O(N²) time and memory per row.

Deviations from the port in the DFTopK/LCRON code (read, not copied):
- masks: padded slots are absent — n counts valid slots, A_j sums over valid l only, the softmax
  runs over valid j, ranks r > n are zero (the port sorts every padded slot too);
- float64 is supported end to end (the port builds float32 constants), and bfloat16/float16
  inputs are computed in float32;
- the pairwise sums use broadcasting and a masked sum, not matrix products with all-ones matrices;
- the membership (u above) is part of the operator; default τ = 50 (RecFlow protocol,
  docs/protocol.md §2.4).
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

__all__ = ["DEFAULT_TAU", "soft_permutation", "neuralsort", "step_bytes"]

# τ of the RecFlow protocol (docs/protocol.md §2.4): the one default of every public
# function taking τ.
DEFAULT_TAU = 50.0


def _soft_permutation(x: torch.Tensor, tau: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Unchecked kernel on a float32/float64 tensor (..., N) -> (..., N, N)."""
    size = x.shape[-1]
    n = valid_counts(mask, x)  # (...,)
    if mask is not None:
        # Fill before any difference: padding may hold inf/NaN, and inf − inf would poison the
        # backward even where the forward masks it out.
        x = x.masked_fill(~mask, 0.0)
    diff = (x.unsqueeze(-1) - x.unsqueeze(-2)).abs()  # (..., N, N) |x_j − x_l|
    if mask is not None:
        diff = diff.masked_fill(~mask.unsqueeze(-2), 0.0)  # only valid l enter A_j
    a = diff.sum(-1)  # (..., N) A_j
    ranks = torch.arange(1, size + 1, device=x.device, dtype=x.dtype)  # r = 1..N
    coef = (n.unsqueeze(-1).to(x.dtype) + 1.0) - 2.0 * ranks  # (..., N) n + 1 − 2r
    logits = (coef.unsqueeze(-1) * x.unsqueeze(-2) - a.unsqueeze(-2)) / tau  # (..., N, N)
    perm = masked_softmax(logits, mask)
    if mask is not None:
        perm = perm.masked_fill(~rank_mask(n, size).unsqueeze(-1), 0.0)  # ranks r > n
    return perm


def soft_permutation(
    scores: torch.Tensor, tau: float = DEFAULT_TAU, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """NeuralSort P̂ of shape (..., N, N): rows = ranks (descending), columns = items.

    Args:
        scores: (..., N) float scores.
        tau: temperature τ > 0.
        mask: (..., N) bool, True = valid, or None. Masked columns and ranks r >= n are 0.
    Returns the relaxation in the dtype of scores (computed in float32 for 16-bit inputs).
    """
    x, tau_f, mask_t = prepare_permutation(scores, "tau", tau, mask)
    return _soft_permutation(x.to(compute_dtype(x.dtype)), tau_f, mask_t).to(x.dtype)


def step_bytes(batch: int, n: int, itemsize: int = 4) -> int:
    """Peak bytes of one stage's training forward+backward through the LCRON loss: the
    |x_j − x_l| matrix, the logits, P̂ and the softmax's saved output, the LCRON label
    relaxation Ŷ and the gradient of P̂: about six (B, N, N) tensors at the peak."""
    return 6 * batch * n * n * itemsize


@register(
    "neuralsort",
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
def neuralsort(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tau: float = DEFAULT_TAU,
) -> torch.Tensor:
    """Soft top-k membership u_j = Σ_{r<k} P̂[r,j] / Σ_r P̂[r,j] from NeuralSort's P̂.

    scores (..., N); k an int or a LongTensor of shape scores.shape[:-1]; mask (..., N) bool or
    None. Returns (..., N) in [0, 1], 0 at masked slots, 1 at valid slots of rows with k >= n.
    """
    return run_permutation_op(_soft_permutation, scores, k, mask, "tau", tau)
