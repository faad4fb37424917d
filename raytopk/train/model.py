"""The cascade as one module: S scorers (retrieval DSSM, pre-rank DIN, ...) and their loss.

Notation: B = requests per batch, N = candidates per request, S = cascade stages.

One ``nn.Module`` holds the scorers and the loss module (which owns the learnable uncertainty
weights w_s), so that one DDP wrap all-reduces the gradients of both.

Mixed precision (``optim.amp``, :func:`autocast_dtype`): the training forward runs the scorers
under bf16 autocast and casts their (B, N) scores to float32 before the operator and the loss,
which stay outside autocast (losses are float32 by design, and autocast refuses
``binary_cross_entropy`` on CUDA). bf16 needs no gradient scaler (float32's exponent range).
Evaluation (``scores``) is float32 always, so metrics do not depend on the training precision.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from raytopk.data.batch import CascadeBatch
from raytopk.train.config import TrainConfig

__all__ = ["CascadeModel", "autocast_dtype", "param_digest"]


def autocast_dtype(amp: bool | str, device: torch.device | str) -> torch.dtype | None:
    """``optim.amp`` resolved for ``device``: torch.bfloat16 (autocast on) or None (off).
    "auto" turns it on for CUDA only, so a CPU run's numerics are plain float32."""
    if amp is True or (amp == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


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
        attention: str = "auto",
    ) -> None:
        super().__init__()
        from raytopk.losses import build_loss
        from raytopk.models import build_scorer

        self.scorers = nn.ModuleList(
            [build_scorer(kind, vocab, dim, attention=attention) for kind in stages]
        )
        self.loss = build_loss(op, dict(op_params), list(ks), k_truth=k_truth, form=form)
        self.amp_dtype: torch.dtype | None = None  # autocast dtype of the training forward

    def scores(self, batch: CascadeBatch) -> list[torch.Tensor]:
        return [scorer(batch) for scorer in self.scorers]  # S x (B, N)

    def forward(self, batch: CascadeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.amp_dtype is None:
            scores = self.scores(batch)
        else:
            with torch.autocast(batch.cand_mask.device.type, dtype=self.amp_dtype):
                scores = self.scores(batch)
            scores = [x.float() for x in scores]  # operator and loss in float32
        # Operators reject non-finite scores with an error (docs/protocol.md §2.1); a diverged model
        # must instead stop the run cleanly, naming the step (the loop's non-finite-loss stop). One
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
    def from_config(
        cls, cfg: TrainConfig, vocab: dict[str, int], device: torch.device | str = "cpu"
    ) -> CascadeModel:
        """The cascade of ``cfg``, with ``optim.amp`` resolved for the ``device`` it trains on."""
        model = cls(
            cfg.model.stages,
            vocab,
            cfg.model.dim,
            cfg.op.name,
            cfg.op.params,
            cfg.loss.ks,
            cfg.loss.k_truth,
            cfg.loss.form,
            cfg.model.attention,
        )
        model.amp_dtype = autocast_dtype(cfg.optim.amp, device)
        return model


def param_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state-dict order: equal digests on two workers mean
    bit-identical replicas (what DDP must keep)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
