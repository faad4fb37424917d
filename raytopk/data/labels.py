"""Ground-truth labels of a request (SPEC.md §4.3): the set G every loss and every metric uses.

Notation: B = requests, N = candidates per request, V_b = request b's valid slots, K = |G|
target (schema.K_TRUTH = 10), G_b = ground-truth top-K.

- G_b = the K valid slots of highest priority. Priorities tie heavily (a request with fewer than
  10 rank_pos items fills G from the ten rank_neg slots, all of priority 7), so ties are broken
  deterministically by slot order (lower slot index first), as a stable sort. A request with
  fewer than K valid slots has all of them in G.

The losses (raytopk.losses) and the metrics (raytopk.metrics) both import it from here, so a
training label and an evaluation hit are the same set by construction.
"""

from __future__ import annotations

import torch

__all__ = ["ground_truth", "check_rows"]


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


@torch.no_grad()
def ground_truth(priority: torch.Tensor, mask: torch.Tensor, k: int = 10) -> torch.Tensor:
    """G: bool (B, N), the k valid slots of highest priority per row (all valid slots when a row
    has fewer than k); ties broken by slot order (lower index wins)."""
    check_rows(priority, mask, "priority")
    if k < 1:
        raise ValueError(f"'k' should be >= 1 but got {k}")
    key = priority.masked_fill(~mask, float("-inf"))
    # A stable descending sort keeps equal priorities in slot order.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (B, N)
    top = torch.zeros_like(mask)
    kk = min(k, priority.shape[-1])
    top.scatter_(-1, order[:, :kk], True)
    return top & mask
