"""Cascade losses (DESIGN.md, Contract 4): ``loss(scores_by_stage, batch) -> (total, parts)``.

``build_loss`` picks the joint BCE cascade loss (SPEC.md §3.1) for top-k operators and the LCRON
loss (SPEC.md §3.3) for permutation relaxations (``get_spec(op).permutation``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from raytopk.losses.cascade import CascadeTopKLoss, combine, topk_stage_loss
from raytopk.losses.lcron import LCRONLoss, lcron_single_stage_loss
from raytopk.ops import get_spec

__all__ = [
    "CascadeTopKLoss",
    "LCRONLoss",
    "build_loss",
    "combine",
    "lcron_single_stage_loss",
    "topk_stage_loss",
]


def build_loss(
    op: str,
    op_params: Mapping[str, float] | None = None,
    ks: Sequence[int] = (10, 10),
    k_truth: int = 10,
) -> nn.Module:
    """The cascade loss module for operator ``op`` (holds the learnable stage weights)."""
    if get_spec(op).permutation:
        return LCRONLoss(op, op_params, ks, k_truth)
    return CascadeTopKLoss(op, op_params, ks, k_truth)
