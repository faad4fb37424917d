"""Retrieval two-tower DSSM (docs/protocol.md §4.6; the retrieval model of Zhu et al., arXiv
2510.11472, on RecFlow, arXiv 2410.20868).

Notation: B = requests, N = candidates per request, L = behaviour sequence length, d = embedding
dim (8), e(·) = embedding lookup, m_t = sequence mask.

    user  u = MLP_u([e(context) (3d); e(user) (5d); Σ_t m_t e(seq_t) / max(1, Σ_t m_t) (5d)])
    item  v = MLP_i([e(item features) (8d)])
    score = ⟨u, v⟩

Both MLPs are Linear-ReLU-…-Linear with widths 128-64-32 (no activation on the output).
Deviation from the authors' code: the sequence mean is masked (their unmasked mean averages the
zero padding rows in, shrinking the interest of users with short histories); an empty sequence
gives the zero vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch
from raytopk.models.embeddings import FeatureEmbeddings
from raytopk.models.layers import mlp

__all__ = ["RetrievalDSSM"]


class RetrievalDSSM(nn.Module):
    """Two-tower retrieval scorer: ``forward(batch) -> (B, N)`` inner-product scores.

    Args:
        vocab: embedding-table name -> rows (meta.json's "vocab").
        dim: embedding dimension d.
        hidden: tower widths; the last is the dimension of the user/item vectors.
    """

    def __init__(
        self, vocab: Mapping[str, int], dim: int = 8, hidden: Sequence[int] = (128, 64, 32)
    ) -> None:
        super().__init__()
        self.emb = FeatureEmbeddings(vocab, dim)
        n_user = len(schema.CONTEXT_FIELDS) + len(schema.USER_FIELDS) + len(schema.SEQ_FIELDS)
        self.user_tower = mlp(n_user * dim, hidden)  # 13d -> 128-64-32
        self.item_tower = mlp(len(schema.ITEM_FIELDS) * dim, hidden)  # 8d -> 128-64-32
        self.out_dim = int(hidden[-1])

    def user_vectors(self, batch: CascadeBatch) -> torch.Tensor:
        """(B, out_dim) user-tower outputs."""
        ctx = self.emb.embed(batch.context, schema.CONTEXT_FIELDS)  # (B, 3d)
        usr = self.emb.embed(batch.user, schema.USER_FIELDS)  # (B, 5d)
        seq = self.emb.embed(batch.seq, schema.SEQ_FIELDS)  # (B, L, 5d)
        m = batch.seq_mask.to(seq.dtype).unsqueeze(-1)  # (B, L, 1)
        # Masked mean; clamp keeps an empty history at 0/1 = 0 instead of 0/0.
        seq_mean = (seq * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, 5d)
        return self.user_tower(torch.cat([ctx, usr, seq_mean], dim=-1))

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """items (..., 8) int64 in schema.ITEM_FIELDS order -> (..., out_dim)."""
        return self.item_tower(self.emb.embed(items, schema.ITEM_FIELDS))

    def forward(self, batch: CascadeBatch) -> torch.Tensor:
        u = self.user_vectors(batch)  # (B, D)
        v = self.item_vectors(batch.items)  # (B, N, D)
        return torch.einsum("bd,bnd->bn", u, v)  # (B, N)
