"""The cascade as one module: S scorers (retrieval DSSM, pre-rank DIN, ...) and their loss.

Notation: B = requests per batch, N = candidates per request, S = cascade stages.

One ``nn.Module`` holds the scorers and the loss module (which owns the learnable uncertainty
weights w_s), so that one DDP wrap all-reduces the gradients of both.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from raytopk.data.batch import CascadeBatch
from raytopk.train.config import TrainConfig

__all__ = ["CascadeModel", "param_digest"]


class CascadeModel(nn.Module):
    """The S scorers of a cascade plus its loss module (which owns the learnable w_s), so that one
    DDP wrap all-reduces the gradients of both. ``forward`` returns (total loss, parts)."""

    def __init__(
        self,
        stages: list[str],
        vocab: dict[str, int],
        dim: int,
        op: str,
        op_params: dict[str, float],
        ks: list[int],
        k_truth: int,
        form: str = "auto",
    ) -> None:
        super().__init__()
        from raytopk.losses import build_loss
        from raytopk.models import build_scorer

        self.scorers = nn.ModuleList([build_scorer(kind, vocab, dim) for kind in stages])
        self.loss = build_loss(op, dict(op_params), list(ks), k_truth=k_truth, form=form)

    def scores(self, batch: CascadeBatch) -> list[torch.Tensor]:
        return [scorer(batch) for scorer in self.scorers]  # S x (B, N)

    def forward(self, batch: CascadeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = self.scores(batch)
        # Operators reject non-finite scores with an error (SPEC §2.1); a diverged model must
        # instead stop the run cleanly, naming the step (the loop's non-finite-loss stop). One
        # device sync per step, next to the loop's own per-step flag exchange.
        valid = batch.cand_mask
        bad = torch.stack([(~torch.isfinite(x) & valid).sum() for x in scores])  # (S,)
        if bool(bad.any()):
            nan = torch.full((), float("nan"), device=valid.device)
            parts = {f"stage{s}": nan for s in range(len(scores))}
            parts["joint"] = nan
            parts.update({f"nonfinite_scores{s}": bad[s].float() for s in range(len(scores))})
            return nan, parts
        return self.loss(scores, batch)

    @classmethod
    def from_config(cls, cfg: TrainConfig, vocab: dict[str, int]) -> CascadeModel:
        return cls(
            cfg.model.stages,
            vocab,
            cfg.model.dim,
            cfg.op.name,
            cfg.op.params,
            cfg.loss.ks,
            cfg.loss.k_truth,
            cfg.loss.form,
        )


def param_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state-dict order: equal digests on two workers mean
    bit-identical replicas (what DDP must keep)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
