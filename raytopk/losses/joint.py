"""Joint cascade loss over a top-k operator (docs/protocol.md §3.1–3.2; Zhu et al., "Differentiable
Fast Top-K Selection for Large-Scale Recommendation", arXiv 2510.11472).

Notation: S stages (retrieval, pre-rank[, rank]), x^s ∈ R^N stage s's scores of one request,
V = its valid slots, y ∈ [0,1]^N the label mass of the ground-truth top-K (data.labels.ground_truth,
K = 10: 1 above the K-th priority, tied slots share the rest, never a sampled negative),
p^s = op(x^s, k_s) the soft top-k_s membership (the bce baseline, docs/protocol.md §3.4:
p^s = σ(x^s)), BCE(p, y) = −y log p − (1 − y) log(1 − p). The form applied to p (bce, bce_log,
bce_logits, mse) is chosen per operator in raytopk.losses.forms (docs/protocol.md §3.5); the
formulas below are form bce.

    L_s = mean_{j∈V} BCE(p^s_j, y_j)
    q   = Π_s p^s,    L_J = mean_{j∈V} BCE(q_j, y_j)
    L   = Σ_s L_s / (2 w_s²) + L_J + log Π_s w_s        (homoscedastic uncertainty weighting)

w_s = exp(ρ_s) with learnable ρ_s initialised to 0 (w_s = 1): positive by construction, and
log w_s = ρ_s exactly. Means are over all valid slots of the batch (not a mean of row means).

Numerics:
- DFTopK in logits form: with z = dftopk_logits(x, k, τ), log p = logσ(z) and log(1 − p) =
  logσ(−z), so the stage BCE is y·softplus(−z) + (1 − y)·softplus(z), with ±∞ logits (masked
  slots, decided rows) replaced by 0 first (softplus(z) − y·z would be ∞ − ∞ at z = +∞). The bce
  baseline is the same with z = x.
- Other operators return p; log p and log(1 − p) are taken of p clamped to the dtype's smallest
  normal number (sparse top-k returns exact 0s and 1s), as torch's BCE clamps its logs.
- Joint term in log space: log q = Σ_s log p^s, and log(1 − q) = log1mexp(log q) (log(−expm1)
  near 0, log1p(−exp) below −log 2), with log q clamped to ≤ −tiny so q = 1 stays finite; for
  the probability-valued operators also to ≥ log(tiny) (q = 0 costs −log(tiny) once, as a
  clamped BCE on q would), while DFTopK's exact logσ(z) sums are never clamped from below (a
  clamp there would cut the gradient of a positive whose z is very negative).
- Non-finite values (masked slots, the +∞ logits of a row with k ≥ #valid) are replaced before
  any nonlinearity, not after: a torch.where after log/softplus would still send NaN gradients.

Per-row k: a request with fewer than K own valid slots has k_b < K positives (data.labels); the
operator still selects the stage's k_s (what the stage keeps), so such a row asks for fewer
positives than the stage keeps, as evaluation does (Recall = Σ_{top-M} y / k_b).

Rows where a stage keeps everything (k_s ≥ #valid): the operator's membership is exactly 1 at
every valid slot and carries no gradient, and BCE(1, 0) = +∞. Such a stage makes no selection in
that row, so the row is left out of L_s's mean; in the joint term the stage contributes the
factor 1; rows where every stage keeps everything are left out of L_J. (Clamping instead, as
torch's BCE does, would add a constant ~100 per negative that the uncertainty weights would then
learn to down-weight.) With RecFlow's evaluation N = 200 this never happens; with sample_num = 0
and k_s = 30 it does for requests with ≤ 30 valid slots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from raytopk.data.batch import CascadeBatch
from raytopk.data.labels import ground_truth
from raytopk.losses.forms import method_spec, resolve_form
from raytopk.ops import check_param

__all__ = [
    "CascadeTopKLoss",
    "combine",
    "uncertainty_total",
    "log1mexp",
    "masked_mean",
    "stage_membership",
    "stage_terms",
    "Membership",
    "topk_stage_loss",
    "resolve_op_params",
    "check_k",
    "check_ks",
    "stage_log_weights",
]

_LN2 = math.log(2.0)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(a)) for a < 0, accurate everywhere (Mächler 2012), NaN-free gradients."""
    near0 = a > -_LN2
    # Each branch gets a harmless input where it is not selected, so its gradient stays finite.
    a_near = torch.where(near0, a, torch.full_like(a, -1.0))
    a_far = torch.where(near0, torch.full_like(a, -1.0), a)
    return torch.where(near0, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ_{valid} values / #valid (0 when nothing is valid); values may be anything elsewhere."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp_min(1).to(values.dtype)


def uncertainty_total(
    stage_losses: Sequence[torch.Tensor], joint: torch.Tensor, log_w: torch.Tensor
) -> torch.Tensor:
    """Σ_s L_s / (2 w_s²) + L_J + Σ_s log w_s with w_s = exp(log_w[s])."""
    inv2w2 = 0.5 * torch.exp(-2.0 * log_w)
    total = joint + log_w.sum()
    for s, loss in enumerate(stage_losses):
        total = total + loss * inv2w2[s]
    return total


def combine(
    stage_losses: Sequence[torch.Tensor], joint: torch.Tensor, log_w: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, parts) of a cascade loss from its per-stage terms L_s and joint term L_J.

    total = uncertainty_total(stage_losses, joint, log_w); parts (detached, for logging):
    stage{s} = L_s, joint = L_J, w{s} = exp(log_w[s]). Shared by CascadeTopKLoss and LCRONLoss.
    """
    if len(stage_losses) != log_w.numel():
        raise ValueError(
            f"'stage_losses' has {len(stage_losses)} stages but 'log_w' has {log_w.numel()}"
        )
    total = uncertainty_total(stage_losses, joint, log_w)
    parts = {f"stage{s}": loss.detach() for s, loss in enumerate(stage_losses)}
    parts["joint"] = joint.detach()
    w = log_w.detach().exp()
    parts.update({f"w{s}": w[s] for s in range(len(stage_losses))})
    return total, parts


def stage_log_weights(num_stages: int) -> nn.Parameter:
    """ρ = log w, one learnable scalar per stage, initialised to 0 (w_s = exp(ρ_s) = 1)."""
    return nn.Parameter(torch.zeros(num_stages))


def check_k(k: object, name: str = "k") -> int:
    """k as an int >= 1 (bools refused); the error names the argument ``name``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"'{name}' should be an int >= 1 but got {k!r}")
    return k


def check_ks(ks: Sequence[int]) -> list[int]:
    """Per-stage k as a non-empty list of ints >= 1."""
    if isinstance(ks, (int, str)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise ValueError(f"'ks' should be a non-empty list of per-stage k but got {ks!r}")
    return [check_k(k, f"ks[{s}]") for s, k in enumerate(ks)]


def resolve_op_params(op: str, op_params: Mapping[str, float] | None) -> dict[str, float]:
    """{param: value} for ``op``; a missing param takes the registry's RecFlow default (the one
    place it is filled: the config's validation and the loss both call this). ValueError /
    TypeError naming the parameter when it is unknown, not a number, not finite or not > 0."""
    spec = method_spec(op)
    params = dict(op_params or {})
    if not spec.param:  # a baseline without a parameter
        if params:
            raise ValueError(f"'op_params' {params}: {op!r} takes no parameters")
        return params
    unknown = sorted(set(params) - {spec.param})
    if unknown:
        raise ValueError(
            f"'op_params' has keys {unknown} that operator {op!r} does not take; "
            f"its parameter is {spec.param!r}"
        )
    params.setdefault(spec.param, spec.default)
    return {spec.param: check_param(spec.param, params[spec.param])}


def _float_scores(x: torch.Tensor) -> torch.Tensor:
    # Losses are computed in at least float32 (bf16/fp16 logs would lose the small terms).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Membership(NamedTuple):
    """One stage's membership as the loss forms need it, finite everywhere (placeholders at
    masked slots): log p, log(1 − p) (for the BCE forms) and p (for bce_logits, mse)."""

    log_p: torch.Tensor
    log_1mp: torch.Tensor
    p: torch.Tensor
    u: torch.Tensor | None = None  # the unclipped membership (form hinge)
    exact: bool = False  # the logs came from logits or exact log-space formulas, not from p


def stage_membership(
    op: str,
    scores: torch.Tensor,
    k: int,
    mask: torch.Tensor,
    params: Mapping[str, float],
    decided: torch.Tensor,
    form: str = "bce",
) -> Membership:
    """Stage membership of method ``op`` (a registered operator or a baseline), from what its
    entry provides (raytopk.losses.forms.method_spec): logits z (p = σ(z), logs log σ(±z)),
    exact logs (form ``bce_log``), or the membership p itself (logs of p clamped at the
    smallest float; with form ``hinge`` also its unclipped u).

    decided (B,) marks rows with k ≥ #valid, where p = 1 exactly: log p is set to 0 and p to 1
    there. Values at masked slots and at log(1 − p) of decided rows are placeholders to be masked
    out.
    """
    spec = method_spec(op)
    keep = mask & ~decided.unsqueeze(-1)
    u = None  # the unclipped membership, form hinge only
    if spec.logits is not None:
        z = spec.logits(scores, k, mask, **params)
        z = torch.where(keep, z, torch.zeros_like(z))  # ±inf out before logσ
        log_p, log_1mp, p = F.logsigmoid(z), F.logsigmoid(-z), torch.sigmoid(z)
        exact = True
    elif form == "bce_log":
        log_p, log_1mp = spec.log_membership(scores, k, mask, keep, **params)
        p = log_p.exp()
        exact = True
    else:
        p = spec.fn(scores, k, mask, **params)
        u = spec.unclipped(scores, p, keep, **params) if form == "hinge" else None
        p = torch.where(keep, p, torch.full_like(p, 0.5))
        tiny = torch.finfo(p.dtype).tiny
        log_p = torch.log(p.clamp_min(tiny))
        log_1mp = torch.log((1.0 - p).clamp_min(tiny))
        exact = False
    full = decided.unsqueeze(-1)
    log_p = torch.where(full, torch.zeros_like(log_p), log_p)
    p = torch.where(full, torch.ones_like(p), p)
    return Membership(log_p, log_1mp, p, u, exact)


def _bce(log_p: torch.Tensor, log_1mp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−y log p − (1 − y) log(1 − p) for the label mass y ∈ [0, 1] (data.labels)."""
    y = labels.to(log_p.dtype)
    return -(y * log_p + (1.0 - y) * log_1mp)


def stage_terms(m: Membership, labels: torch.Tensor, form: str) -> torch.Tensor:
    """Per-slot stage loss of ``form`` (losses.forms)."""
    y = labels.to(m.p.dtype)
    if form in ("bce", "bce_log"):
        return _bce(m.log_p, m.log_1mp, y)
    if form == "bce_logits":  # the membership as a logit (the authors' reference code)
        return F.softplus(m.p) - y * m.p
    if form == "mse":
        return (m.p - y) ** 2
    if form == "hinge":  # on the unclipped membership: = y(1 − m) + (1 − y)m inside [0, 1]
        return y * F.relu(1.0 - m.u) + (1.0 - y) * F.relu(m.u)
    raise ValueError(
        f"'form' should be one of bce, bce_log, bce_logits, mse, hinge but got {form!r}"
    )


def topk_stage_loss(
    op: str,
    scores: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
    *,
    form: str = "bce",
    **params: float,
) -> torch.Tensor:
    """Single-stage L_s (mean of the ``form`` terms over valid slots of rows with k < #valid) for
    a non-permutation operator; the step benchmark's loss (docs/protocol.md §5.1). labels:
    y (B, N), bool or the label mass in [0, 1]."""
    params = resolve_op_params(op, params)
    scores = _float_scores(scores)
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    decided = mask.sum(-1) <= k
    m = stage_membership(op, scores, k, mask, params, decided, form)
    return masked_mean(stage_terms(m, labels, form), mask & ~decided.unsqueeze(-1))


class CascadeTopKLoss(nn.Module):
    """Joint cascade loss of docs/protocol.md §3.1 over a non-permutation operator, or the ``bce``
    baseline of docs/protocol.md §3.4 (no operator: p = σ(x), stage k unused).

    Args:
        op: dftopk, lapsum, sparse_topk (a registered operator) or ``bce``.
        op_params: {param: value}; missing -> the registry's RecFlow default (bce: none).
        ks: per-stage k (docs/protocol.md §3.2), e.g. [10, 10] or [30, 20]; len(ks) = number
            of stages.
        k_truth: K of the ground-truth labels.
        form: the loss form (losses.forms; ``auto``: the form chosen for ``op``).

    ``forward(scores, batch) -> (total, parts)``; parts (detached): stage{s}, joint, w{s}.
    """

    def __init__(
        self,
        op: str,
        op_params: Mapping[str, float] | None = None,
        ks: Sequence[int] = (10, 10),
        k_truth: int = 10,
        form: str = "auto",
    ) -> None:
        super().__init__()
        spec = method_spec(op)
        self.selects = spec.selects
        if not spec.param:
            if op_params:
                raise ValueError(f"'op_params' {dict(op_params)}: {op!r} takes no parameters")
            self.params: dict[str, float] = {}
        else:
            if spec.permutation:
                raise ValueError(
                    f"operator {op!r} is a permutation relaxation: use LCRONLoss "
                    "(build_loss picks it)"
                )
            self.params = resolve_op_params(op, op_params)
        self.k_truth = check_k(k_truth, "k_truth")
        self.op = op
        self.form = resolve_form(op, form)
        self.ks = check_ks(ks)
        self.log_w = stage_log_weights(len(self.ks))  # ρ_s, w_s = exp(ρ_s)

    @property
    def weights(self) -> torch.Tensor:
        return self.log_w.detach().exp()

    def forward(
        self, scores: Sequence[torch.Tensor], batch: CascadeBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = ground_truth(batch.priority, batch.cand_mask, self.k_truth)
        return self.from_labels(scores, labels, batch.cand_mask)

    def from_labels(
        self, scores: Sequence[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss with explicit labels (B, N) (bool, or the label mass in [0, 1]) and mask
        (B, N) bool."""
        if len(scores) != len(self.ks):
            raise ValueError(
                f"'scores' has {len(scores)} stages but ks {self.ks} name {len(self.ks)}"
            )
        n_valid = mask.sum(-1)  # (B,)
        all_decided = torch.ones_like(n_valid, dtype=torch.bool)
        stage_losses, log_q, q = [], None, None
        for s, (x, k) in enumerate(zip(scores, self.ks)):
            if x.shape != mask.shape:
                raise ValueError(
                    f"'scores[{s}]' should have shape {tuple(mask.shape)} but got {tuple(x.shape)}"
                )
            x = _float_scores(x)
            # This stage keeps every valid slot of the row (the bce baseline selects nothing).
            decided = n_valid <= k if self.selects else torch.zeros_like(all_decided)
            m = stage_membership(self.op, x, k, mask, self.params, decided, self.form)
            stage_losses.append(
                masked_mean(stage_terms(m, labels, self.form), mask & ~decided.unsqueeze(-1))
            )
            exact = m.exact
            log_q = m.log_p if log_q is None else log_q + m.log_p
            q = m.p if q is None else q * m.p
            all_decided &= decided
        joint_valid = mask & ~all_decided.unsqueeze(-1)
        y = labels.to(q.dtype)
        if self.form == "bce_logits":
            joint_terms = F.softplus(q) - y * q
        elif self.form in ("mse", "hinge"):
            joint_terms = (q - y) ** 2
        else:
            tiny = torch.finfo(log_q.dtype).tiny
            if exact:
                log_q = log_q.clamp(max=-tiny)  # q = 1 would make log(1 - q) = -inf
            else:
                # Memberships given as probabilities had their logs clamped at log(tiny) per
                # stage; clamp the product the same way (q = 0 costs -log(tiny) once, not once
                # per stage), i.e. BCE(q, y) with its logs clamped as torch's BCE does.
                log_q = log_q.clamp(min=math.log(tiny), max=-tiny)
            joint_terms = -(y * log_q + (1.0 - y) * log1mexp(log_q))
        joint = masked_mean(joint_terms, joint_valid)
        return combine(stage_losses, joint, self.log_w)
