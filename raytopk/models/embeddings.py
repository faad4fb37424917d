"""Shared id-embedding tables of the RecFlow models (docs/protocol.md §4.6).

One ``nn.Embedding`` per table name in ``schema.EMBEDDING_TABLE`` (user_id, device_id, gender,
age, province, video_id, author_id, category_level_two, category_level_one, upload_type, weekday,
hour, minute). Features that share a table (a behaviour's video_id and a candidate's video_id; the
upload time and the request time) look up the same rows. Row 0 is padding (stored ids are raw
id + 1, schema.py): ``padding_idx=0`` keeps it the zero vector with no gradient, so a padded
sequence position or candidate slot embeds to exactly 0.

Notation: d = embedding dimension (8 in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from raytopk.data import schema

__all__ = ["FeatureEmbeddings", "check_vocab"]


def check_vocab(vocab: Mapping[str, int]) -> dict[str, int]:
    """Validate ``vocab`` (embedding-table name -> rows, as in meta.json) for every table that
    schema.EMBEDDING_TABLE names; extra keys are ignored."""
    if not isinstance(vocab, Mapping):
        raise TypeError(f"'vocab' should be a mapping table -> rows but got {type(vocab).__name__}")
    tables = sorted(set(schema.EMBEDDING_TABLE.values()))
    missing = [t for t in tables if t not in vocab]
    if missing:
        raise ValueError(
            f"'vocab' is missing embedding tables {missing}; got keys {sorted(vocab)} "
            f"(expected every value of schema.EMBEDDING_TABLE: {tables})"
        )
    out: dict[str, int] = {}
    for t in tables:
        rows = vocab[t]
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 2:
            raise ValueError(
                f"'vocab[{t!r}]' should be an int >= 2 (padding row 0 + at least one id) "
                f"but got {rows!r}"
            )
        out[t] = rows
    return out


class FeatureEmbeddings(nn.Module):
    """Embedding tables keyed by table name; ``embed(ids, fields)`` looks fields up by feature.

    Args:
        vocab: table name -> number of rows (every value of schema.EMBEDDING_TABLE).
        dim: embedding dimension d.
    """

    def __init__(self, vocab: Mapping[str, int], dim: int = 8) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"'dim' should be an int >= 1 but got {dim!r}")
        self.vocab = check_vocab(vocab)
        self.dim = dim
        self.tables = nn.ModuleDict(
            {t: nn.Embedding(rows, dim, padding_idx=0) for t, rows in self.vocab.items()}
        )
        # PyTorch's default N(0, 1) init (as the paper's code); padding_idx zeroes row 0.

    def embed(self, ids: torch.Tensor, fields: Sequence[str]) -> torch.Tensor:
        """ids (..., F) int64 in ``fields`` order -> (..., F * d), fields concatenated."""
        if ids.shape[-1] != len(fields):
            raise ValueError(
                f"'ids' has {ids.shape[-1]} features in its last dim but fields {tuple(fields)} "
                f"name {len(fields)}"
            )
        parts = [self.tables[schema.EMBEDDING_TABLE[f]](ids[..., i]) for i, f in enumerate(fields)]
        return torch.cat(parts, dim=-1)  # (..., F * d)
