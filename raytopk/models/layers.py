"""Layers shared by the scorers (docs/protocol.md §4.6): the MLP towers of the retrieval DSSM and
the pre-rank DIN's scoring MLP.

Notation: widths = the output width of each Linear, in order; the last is the output dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp"]


def mlp(in_dim: int, widths: Sequence[int]) -> nn.Sequential:
    """Linear-ReLU stack ending in a plain Linear of width widths[-1]."""
    if not widths:
        raise ValueError(f"'hidden' should name at least one layer width but got {widths!r}")
    layers: list[nn.Module] = []
    prev = in_dim
    for i, w in enumerate(widths):
        layers.append(nn.Linear(prev, int(w)))
        if i < len(widths) - 1:
            layers.append(nn.ReLU())
        prev = int(w)
    return nn.Sequential(*layers)
