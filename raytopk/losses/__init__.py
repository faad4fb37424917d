"""Cascade losses (docs/design.md, Contract: loss): ``loss(scores_by_stage, batch) -> (total,
parts)``.

``build_loss`` picks the joint cascade loss (docs/protocol.md §3.1) for top-k operators and for the
``bce`` baseline (§3.4, no operator), and the LCRON loss (§3.3) for permutation relaxations
(``get_spec(op).permutation``). The names a run may train with, and each one's loss form (§3.5),
are in raytopk.losses.forms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from raytopk.losses.forms import (
    BASELINES,
    FORMS,
    check_method,
    default_form,
    forms_for,
    is_operator,
    list_methods,
    method_spec,
    resolve_form,
)
from raytopk.losses.joint import CascadeTopKLoss, combine, topk_stage_loss
from raytopk.losses.lcron import LCRONLoss, lcron_single_stage_loss

__all__ = [
    "BASELINES",
    "FORMS",
    "check_method",
    "default_form",
    "forms_for",
    "is_operator",
    "list_methods",
    "resolve_form",
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
    form: str = "auto",
) -> nn.Module:
    """The cascade loss module for ``op`` (a registered operator or a baseline of
    ``list_methods()``; holds the learnable stage weights), trained with loss ``form``."""
    check_method(op)
    if method_spec(op).permutation:
        resolve_form(op, form)
        return LCRONLoss(op, op_params, ks, k_truth)
    return CascadeTopKLoss(op, op_params, ks, k_truth, form)
