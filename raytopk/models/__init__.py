"""Cascade scorers: CascadeBatch -> scores (B, N). The loss is applied outside (docs/design.md,
Contract: model). A cascade is a list of kinds, e.g. ["dssm", "din"] (3-stage:
["dssm", "din", "din"]).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from raytopk.models.din import PrerankDIN
from raytopk.models.dssm import RetrievalDSSM
from raytopk.models.embeddings import FeatureEmbeddings

__all__ = [
    "RetrievalDSSM",
    "PrerankDIN",
    "FeatureEmbeddings",
    "SCORERS",
    "SCORER_KINDS",
    "build_scorer",
]

SCORERS: dict[str, type[nn.Module]] = {"dssm": RetrievalDSSM, "din": PrerankDIN}
SCORER_KINDS: tuple[str, ...] = tuple(SCORERS)  # the config's model.stages values


def build_scorer(
    kind: str, vocab: Mapping[str, int], dim: int = 8, attention: str = "auto"
) -> nn.Module:
    """A fresh scorer of ``kind`` ("dssm" or "din") with embedding dimension ``dim``;
    ``attention`` picks DIN's attention path (raytopk.models.attention; unused by "dssm")."""
    if kind not in SCORERS:
        raise ValueError(f"unknown scorer kind {kind!r}; valid kinds: {sorted(SCORERS)}")
    if kind == "din":
        return PrerankDIN(vocab, dim=dim, attention=attention)
    return SCORERS[kind](vocab, dim=dim)
