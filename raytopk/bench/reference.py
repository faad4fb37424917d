"""Reference formulations the operator benchmark measures DFTopK against (docs/protocol.md
§2.1, §5).

Notation: B = rows (requests), N = scores per row, k = selected per row, τ = DFTopK temperature,
x_[1] ≥ … ≥ x_[N] a row's order statistics, θ_k(x) = (x_[k] + x_[k+1]) / 2.

- ``authors_dftopk_logits``: the authors' formulation of DFTopK (Zhu et al., arXiv 2510.11472):
  two k-th-order-statistic calls, ``torch.kthvalue`` for x_[k] and x_[k+1], autograd through
  both, then z = (x − θ_k(x)) / τ (σ(z) is the membership);
- ``full_sort_logits``: θ_k(x) from a full sort, x − θ_k(x) (what a sort-based operator pays);
- ``elementwise_floor_loss``: one BCE-with-logits pass over the scores (x / τ against the label),
  the cost no top-k loss can go below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytopk.ops.dftopk import DEFAULT_TAU

__all__ = [
    "authors_dftopk_logits",
    "authors_dftopk",
    "full_sort_logits",
    "elementwise_floor_loss",
]


def authors_dftopk_logits(x: torch.Tensor, k: int, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """The authors' DFTopK logits: x_[k] and x_[k+1] from two ``torch.kthvalue`` calls (autograd
    differentiates through both), z = (x − (x_[k] + x_[k+1]) / 2) / τ. Needs 1 <= k < N."""
    n = x.shape[-1]
    if not 1 <= k < n:
        raise ValueError(f"'k' should satisfy 1 <= k < N={n} but got {k}")
    hi = torch.kthvalue(x, n - k + 1, dim=-1).values  # x_[k] = (N−k+1)-th smallest
    lo = torch.kthvalue(x, n - k, dim=-1).values  # x_[k+1]
    return (x - 0.5 * (hi + lo).unsqueeze(-1)) / tau


def authors_dftopk(x: torch.Tensor, k: int, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """σ of ``authors_dftopk_logits``: the authors' soft top-k membership."""
    return torch.sigmoid(authors_dftopk_logits(x, k, tau))


def full_sort_logits(x: torch.Tensor, k: int) -> torch.Tensor:
    """x − θ_k(x) with θ_k from a full descending sort (the headline's sort line; no τ)."""
    s = torch.sort(x, dim=-1, descending=True).values
    return x - 0.5 * (s[..., k - 1] + s[..., k]).unsqueeze(-1)


def elementwise_floor_loss(
    x: torch.Tensor, y: torch.Tensor, tau: float = DEFAULT_TAU
) -> torch.Tensor:
    """One BCE-with-logits pass over the scores: the elementwise floor of any top-k loss."""
    return F.binary_cross_entropy_with_logits(x / tau, y)
