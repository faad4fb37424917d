"""Ground-truth labels of a request (docs/protocol.md §4.3): the label mass y every loss and every
metric uses.

Notation: B = requests, N = candidates per request, V_b = request b's valid slots, K = the
ground-truth top set size (schema.K_TRUTH = 10), π_j = slot j's priority, O_b = {j ∈ V_b : π_j > 0}
request b's own valid slots (a sampled negative has priority 0, docs/protocol.md §4.2).

The rule (one rule, used by every loss family and every metric):

    k_b = min(K, |O_b|)                                    (per-row k: the row's positives)
    θ_b = the k_b-th largest priority in O_b               (the K-th priority; θ_b > 0)
    A_b = {j ∈ O_b : π_j > θ_b},  T_b = {j ∈ O_b : π_j = θ_b}
    y_bj = 1 (j ∈ A_b),  (k_b − |A_b|) / |T_b| (j ∈ T_b),  0 otherwise

so Σ_j y_bj = k_b: items strictly above the K-th priority are positives, the items tied AT the
K-th priority share the remaining label mass equally (no slot-order tie-break: it would teach the
model slot positions), and a sampled negative is never a positive: a request with fewer than K
valid own slots has fewer positives, not sampled ones. With RecFlow's rank_pos (10 per request)
G is exactly the rank_pos slots and every y is 0 or 1.

Consumers: the BCE cascade loss and the bce baseline take BCE(p, y) with this soft y; LCRON takes
ŷ = y, ȳ = 1 − y; the metrics count a hit by its mass: Recall@K@M = Σ_{j ∈ top-M} y_j / k_b.
"""

from __future__ import annotations

import torch

__all__ = ["ground_truth", "num_positives", "check_rows"]


def check_rows(values: torch.Tensor, mask: torch.Tensor, name: str = "scores") -> None:
    """Validate per-slot ``values`` (B, N) and their validity ``mask`` (B, N) bool; the error
    names the argument (``name`` for values, 'mask' for the mask) and what it received."""
    if values.dim() != 2:
        raise ValueError(f"'{name}' should have shape (B, N) but got {tuple(values.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(values.shape):
        raise ValueError(
            f"'mask' should be a bool tensor of shape {tuple(values.shape)} but got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )


def num_positives(priority: torch.Tensor, mask: torch.Tensor, k: int = 10) -> torch.Tensor:
    """k_b = min(k, #valid slots of priority > 0) per row, LongTensor (B,)."""
    check_rows(priority, mask, "priority")
    return ((priority > 0) & mask).sum(-1).clamp(max=k)


@torch.no_grad()
def ground_truth(priority: torch.Tensor, mask: torch.Tensor, k: int = 10) -> torch.Tensor:
    """y: float (B, N) in [0, 1], Σ_j y_bj = k_b (module docstring): 1 above the k-th priority of
    the row's own valid slots, the remaining mass shared equally by the slots tied at it, 0 at
    sampled negatives (priority 0) and masked slots. float32 unless priority is float64."""
    check_rows(priority, mask, "priority")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"'k' should be >= 1 but got {k}")
    dtype = priority.dtype if priority.dtype == torch.float64 else torch.float32
    own = mask & (priority > 0)
    kb = own.sum(-1).clamp(max=k)  # (B,)
    key = priority.to(dtype).masked_fill(~own, float("-inf"))
    kk = min(k, priority.shape[-1])
    top = torch.topk(key, kk, dim=-1).values  # (B, kk) descending
    # θ_b = the kb-th largest own priority (rows with kb = 0 have no positives).
    theta = top.gather(-1, (kb - 1).clamp(min=0).unsqueeze(-1))  # (B, 1)
    above = own & (key > theta)
    tied = own & (key == theta)
    n_above = above.sum(-1, keepdim=True).to(dtype)
    n_tied = tied.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    share = (kb.unsqueeze(-1).to(dtype) - n_above) / n_tied  # (B, 1)
    y = torch.where(above, torch.ones_like(key), torch.zeros_like(key))
    y = torch.where(tied, share.expand_as(y), y)
    return torch.where((kb > 0).unsqueeze(-1), y, torch.zeros_like(y))
