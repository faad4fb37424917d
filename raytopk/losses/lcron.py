"""LCRON loss for the permutation relaxations (docs/protocol.md §3.3; Wang et al., "LCRON: Learning
Cascade Ranking as One Network", arXiv 2503.09492).

Notation: S stages, P̂^s ∈ R^{N×N} stage s's soft permutation (rows = ranks descending, columns =
items) from the operator's ``soft_permutation(x^s, param, mask)``, Ŷ the same relaxation of the
priorities at the label temperature (NeuralSort/SoftSort τ = 1e-4, DiffSort steepness 1000),
K = k_truth (10), k_s = stage s's k (docs/protocol.md §3.2; default K), V = valid slots, sg =
stop-gradient.

    u^s_j = Σ_{r<k_s} P̂^s[r,j] / (sg(Σ_r P̂^s[r,j]) + ε)          (soft top-k_s membership)
    d^s_j = Σ_{r≥k_s} P̂^s[r,j] / (sg(Σ_r P̂^s[r,j]) + ε)
    ŷ_j = Σ_{r<K} Ŷ[r,j],  ȳ_j = Σ_{r≥K} Ŷ[r,j]
    L_s = mean_{j∈V} [−ŷ_j log(u^s_j + ε) − ȳ_j log(d^s_j + ε)]
    L_J = mean_{j∈V} [−ŷ_j log(Π_s u^s_j + ε) − (1 − ŷ_j) log(1 − Π_s (1 − d^s_j) + ε)]
    L   = Σ_s L_s / (2 w_s²) + L_J + log Π_s w_s,    w_s = exp(ρ_s), ρ_s initialised to 0

ε = 1e-8. Means are over all valid slots of the batch.

Labels (one rule for every loss family and the metrics, docs/protocol.md §4.3): ŷ = y, the label
mass of data.labels.ground_truth (1 above the K-th priority, the slots tied at the K-th priority
share the remaining mass, a sampled negative never a positive, per-row k_b = min(K, #valid own
slots)), and ȳ = 1 − ŷ. This is what the label relaxation Ŷ at τ_label = 1e-4 gives for integer
priorities (tied items get equal shares of the ranks their block spans) except that Ŷ would rank
sampled negatives (priority 0) into the top K of a request with fewer than K own slots; it also
saves building Ŷ (an (N, N) matrix per request). ``label_permutation`` (Ŷ itself) is kept for
comparisons with the authors' code; ``from_label_perm`` trains on it.

Masks: masked slots are passed to soft_permutation as the mask, and additionally given the
priority −1 (below every valid priority, the lowest being 0) in the label relaxation; they are
left out of every mean. A stage whose k_s ≥ #valid keeps every item of the row: there u = 1,
d = 0 are set exactly, the row is left out of L_s, the stage contributes the factor 1 / 0 to the
joint products, and rows where every stage keeps everything are left out of L_J (as in the BCE
cascade loss, raytopk.losses.joint).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from raytopk.data.batch import CascadeBatch
from raytopk.data.labels import ground_truth
from raytopk.losses.joint import (
    check_k,
    check_ks,
    combine,
    masked_mean,
    resolve_op_params,
    stage_log_weights,
)
from raytopk.ops import get_spec

__all__ = [
    "LCRONLoss",
    "label_param_of",
    "lcron_single_stage_loss",
    "soft_membership",
    "label_membership",
    "soft_permutation_fn",
]

# docs/protocol.md §2.4 protocol values of the label relaxation (τ_label, β_label).
def label_param_of(op: str) -> float:
    """The label relaxation's parameter the registry declares for permutation operator ``op``
    (OpSpec.label_param); ValueError when it declares none."""
    value = get_spec(op).label_param
    if value is None:
        raise ValueError(
            f"no label relaxation parameter known for operator {op!r}; declare label_param "
            "in its registration or pass 'label_param'"
        )
    return float(value)
EPS = 1e-8


def soft_permutation_fn(op: str) -> Callable[..., torch.Tensor]:
    """The ``soft_permutation(scores, param, mask=None)`` of a registered permutation op."""
    spec = get_spec(op)
    if not spec.permutation:
        raise ValueError(f"operator {op!r} is not a permutation relaxation (no soft_permutation)")
    module = importlib.import_module(spec.fn.__module__)
    fn = getattr(module, "soft_permutation", None)
    if fn is None:
        raise ValueError(f"operator module {module.__name__} does not define soft_permutation")
    return fn


def _check_perm(perm: torch.Tensor, name: str) -> int:
    if perm.dim() < 2 or perm.shape[-1] != perm.shape[-2]:
        raise ValueError(f"'{name}' should have shape (..., N, N) but got {tuple(perm.shape)}")
    return perm.shape[-1]


def _check_k(k: object, n: int, name: str) -> int:
    return min(check_k(k, name), n)


def soft_membership(
    perm: torch.Tensor, k: int, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, d): soft top-k / bottom membership per item, column sums detached (stop-gradient)."""
    n = _check_perm(perm, "perm")
    k = _check_k(k, n, "k")
    col = perm.sum(-2).detach() + eps  # sg(Σ_r P̂[r, j]) + ε, (..., N)
    return perm[..., :k, :].sum(-2) / col, perm[..., k:, :].sum(-2) / col


def label_membership(labels_perm: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŷ, ȳ) = label mass on ranks < k and on ranks >= k per item."""
    n = _check_perm(labels_perm, "labels_perm")
    k = _check_k(k, n, "k")
    return labels_perm[..., :k, :].sum(-2), labels_perm[..., k:, :].sum(-2)


def _valid_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape[:-1], dtype=torch.bool, device=like.device)
    if tuple(mask.shape) != tuple(like.shape[:-1]) or mask.dtype != torch.bool:
        raise ValueError(
            f"'mask' should be a bool tensor of shape {tuple(like.shape[:-1])} but got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return mask


def _stage_term(
    u: torch.Tensor, d: torch.Tensor, yhat: torch.Tensor, ybar: torch.Tensor, eps: float
) -> torch.Tensor:
    return -(yhat * torch.log(u + eps) + ybar * torch.log(d + eps))


def lcron_single_stage_loss(
    perm: torch.Tensor,
    labels_perm: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
    *,
    k_label: int | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Single-stage LCRON loss L_s from a soft permutation and a label permutation.

    Args:
        perm: (..., N, N) the stage's soft permutation (rows = ranks, columns = items).
        labels_perm: (..., N, N) the label relaxation Ŷ (no gradient needed).
        k: the stage's k (u, d split the ranks at k).
        mask: (..., N) bool valid slots, or None (all valid).
        k_label: K of the labels (ŷ, ȳ); defaults to k.
    Rows with k >= #valid (nothing to select) are left out of the mean.
    """
    if perm.shape != labels_perm.shape:
        raise ValueError(
            f"'perm' {tuple(perm.shape)} and 'labels_perm' {tuple(labels_perm.shape)} "
            "should have the same shape"
        )
    valid = _valid_mask(mask, perm)
    u, d = soft_membership(perm, k, eps)
    yhat, ybar = label_membership(labels_perm, k if k_label is None else k_label)
    rows = valid.sum(-1) > k
    return masked_mean(_stage_term(u, d, yhat, ybar, eps), valid & rows.unsqueeze(-1))


class LCRONLoss(nn.Module):
    """LCRON cascade loss of docs/protocol.md §3.3 over a permutation operator.

    Args:
        op: registered permutation operator (neuralsort, softsort, diffsort).
        op_params: {param: value} of the model relaxation; missing -> registry default.
        ks: per-stage k; len(ks) = number of stages.
        k_truth: K of the labels.
        label_param: the relaxation parameter for the labels; default the registry's label_param.
        eps: ε of the formulas.

    ``forward(scores, batch) -> (total, parts)``; parts (detached): stage{s}, joint, w{s}.
    """

    def __init__(
        self,
        op: str,
        op_params: Mapping[str, float] | None = None,
        ks: Sequence[int] = (10, 10),
        k_truth: int = 10,
        label_param: float | None = None,
        eps: float = EPS,
    ) -> None:
        super().__init__()
        self.soft_permutation = soft_permutation_fn(op)
        k_truth = check_k(k_truth, "k_truth")
        if label_param is None:
            label_param = label_param_of(op)
        self.op = op
        self.form = "lcron"
        self.param_name = get_spec(op).param
        self.params = resolve_op_params(op, op_params)
        self.label_param = float(label_param)
        self.ks = check_ks(ks)
        self.k_truth = k_truth
        self.eps = float(eps)
        self.log_w = stage_log_weights(len(self.ks))  # ρ_s, w_s = exp(ρ_s)

    @property
    def weights(self) -> torch.Tensor:
        return self.log_w.detach().exp()

    @torch.no_grad()
    def label_permutation(self, priority: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Ŷ: the relaxation of the priorities at the label parameter, (B, N, N)."""
        prio = priority.float().masked_fill(~mask, -1.0)  # below every valid priority (>= 0)
        return self.soft_permutation(prio, self.label_param, mask)

    def forward(
        self, scores: Sequence[torch.Tensor], batch: CascadeBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.cand_mask
        return self.from_labels(scores, ground_truth(batch.priority, mask, self.k_truth), mask)

    def from_labels(
        self, scores: Sequence[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss with the label mass y (B, N) in [0, 1] (ŷ = y, ȳ = 1 − y) and mask (B, N)."""
        y = labels.to(torch.float64 if labels.dtype == torch.float64 else torch.float32)
        return self._loss(scores, y, 1.0 - y, mask)

    def from_label_perm(
        self, scores: Sequence[torch.Tensor], labels_perm: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss with an explicit label permutation Ŷ (B, N, N) and mask (B, N)."""
        yhat, ybar = label_membership(labels_perm, self.k_truth)
        return self._loss(scores, yhat, ybar, mask)

    def _loss(
        self,
        scores: Sequence[torch.Tensor],
        yhat: torch.Tensor,
        ybar: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(scores) != len(self.ks):
            raise ValueError(
                f"'scores' has {len(scores)} stages but ks {self.ks} name {len(self.ks)}"
            )
        eps = self.eps
        n_valid = mask.sum(-1)
        all_decided = torch.ones_like(n_valid, dtype=torch.bool)
        stage_losses, u_prod, keep_prod = [], None, None
        for s, (x, k) in enumerate(zip(scores, self.ks)):
            if x.shape != mask.shape:
                raise ValueError(
                    f"'scores[{s}]' should have shape {tuple(mask.shape)} but got {tuple(x.shape)}"
                )
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            perm = self.soft_permutation(x, self.params[self.param_name], mask)
            u, d = soft_membership(perm, k, eps)
            decided = (n_valid <= k).unsqueeze(-1)  # this stage keeps every valid slot
            u = torch.where(decided, torch.ones_like(u), u)
            d = torch.where(decided, torch.zeros_like(d), d)
            yh, yb = yhat.to(u.dtype), ybar.to(u.dtype)
            stage_losses.append(masked_mean(_stage_term(u, d, yh, yb, eps), mask & ~decided))
            u_prod = u if u_prod is None else u_prod * u
            keep_prod = 1.0 - d if keep_prod is None else keep_prod * (1.0 - d)
            all_decided &= decided.squeeze(-1)
        yh = yhat.to(u_prod.dtype)
        joint_terms = -(
            yh * torch.log(u_prod + eps) + (1.0 - yh) * torch.log(1.0 - keep_prod + eps)
        )
        joint = masked_mean(joint_terms, mask & ~all_decided.unsqueeze(-1))
        return combine(stage_losses, joint, self.log_w)
