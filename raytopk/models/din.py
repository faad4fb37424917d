"""Pre-ranking DIN-style scorer (docs/protocol.md §4.6; the pre-ranking model of Zhu et al.,
arXiv 2510.11472; attention of Zhou et al., "Deep Interest Network", KDD 2018).

Notation: B = requests, N = candidates, L = behaviour sequence length, d = embedding dim (8),
H = attention hidden width (80), e_t = embedding of behaviour t (5d: video, author, cat2, cat1,
upload_type), c = the candidate's embedding over the same 5 fields (5d), m_t = sequence mask.

    a_t      = w₂ᵀ ReLU(W₁ [e_t; c] + b₁) + b₂                  (MLP 10d -> H -> 1)
    α        = masked softmax_t(a)   (α_t = 0 where m_t = 0; all-zero when the history is empty)
    interest = Σ_t α_t e_t                                        (5d)
    score    = MLP([e(user) 5d; e(context) 3d; interest 5d; c 5d; e(upload time) 3d])
               with widths 128-128-32-1 (ReLU between, plain Linear output).

Vectorised over (B, N, L): W₁[e_t; c] = W_e e_t + W_c c, so the first layer costs O((L + N)·H)
per request and only the ReLU/second layer touch the (B, N, L, H) block. That block is the
model's memory peak (B=1024, N=200, L=50, H=80 is 3.3 GB in float32). On CPU the score
w₂ᵀ ReLU(·) + b₂ is computed by a fused kernel that never builds the block, forward or backward
(raytopk/models/attention.py, with its closed-form backward); ``attention="auto"`` picks it on CPU.
The plain path ("reference", and "auto" off the CPU) builds the block in candidate chunks of at
most ``attn_chunk_elems`` elements; under autograd the chunks are gradient-checkpointed
(recomputed in backward) so only one is alive at a time.

Deviation from the authors' code: the softmax is masked (padded behaviours get weight exactly 0)
and an empty history gives interest 0 instead of NaN or an average of padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch
from raytopk.models.attention import attention_scores, resolve_impl
from raytopk.models.embeddings import FeatureEmbeddings
from raytopk.models.layers import mlp
from raytopk.nn import masked_softmax

__all__ = ["PrerankDIN"]

# The candidate's first 5 features are the behaviour fields, in the same order; the last 3 are
# its upload time. The attention pairs e_t with c field by field, so this must hold.
_CAND_FIELDS = schema.ITEM_FIELDS[: len(schema.SEQ_FIELDS)]
_UPLOAD_FIELDS = schema.ITEM_FIELDS[len(schema.SEQ_FIELDS) :]
assert _CAND_FIELDS == schema.SEQ_FIELDS, (_CAND_FIELDS, schema.SEQ_FIELDS)


class PrerankDIN(nn.Module):
    """DIN pre-ranking scorer: ``forward(batch) -> (B, N)`` scores.

    Args:
        vocab: embedding-table name -> rows (meta.json's "vocab").
        dim: embedding dimension d.
        attn_hidden: H, hidden width of the attention MLP.
        hidden: widths of the scoring MLP (the final width-1 output layer is added).
        attn_chunk_elems: memory budget, in elements, of one (B, n, L, H) block (plain path).
        attention: "auto" (fused on CPU, plain elsewhere), "fused" or "reference" (the plain
            path); see raytopk.models.attention.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        dim: int = 8,
        attn_hidden: int = 80,
        hidden: Sequence[int] = (128, 128, 32),
        attn_chunk_elems: int = 2**28,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        if attn_chunk_elems < 1:
            raise ValueError(f"'attn_chunk_elems' should be >= 1 but got {attn_chunk_elems}")
        resolve_impl(attention, "cpu")  # a bad name fails here, not at the first batch
        self.attention = attention
        self.emb = FeatureEmbeddings(vocab, dim)
        e_dim = len(schema.SEQ_FIELDS) * dim  # 5d
        self.attn_in = nn.Linear(2 * e_dim, attn_hidden)  # on [e_t; c]
        self.attn_out = nn.Linear(attn_hidden, 1)
        n_user = len(schema.USER_FIELDS) + len(schema.CONTEXT_FIELDS)
        in_dim = (n_user + 2 * len(schema.SEQ_FIELDS) + len(_UPLOAD_FIELDS)) * dim  # 21d
        self.scorer = mlp(in_dim, (*hidden, 1))
        self.e_dim = e_dim
        self.attn_chunk_elems = int(attn_chunk_elems)

    def _attend(
        self, pe: torch.Tensor, pc: torch.Tensor, seq: torch.Tensor, seq_mask: torch.Tensor
    ) -> torch.Tensor:
        """pe (B, L, H), pc (B, n, H), seq (B, L, 5d), seq_mask (B, L) -> interest (B, n, 5d)."""
        a = attention_scores(pe, pc, self.attn_out.weight, self.attn_out.bias, self.attention)
        # masked_softmax leaves an empty history finite and uniform; the mask zeroes it.
        alpha = masked_softmax(a, seq_mask) * seq_mask.unsqueeze(1).to(a.dtype)  # (B, n, L)
        return torch.matmul(alpha, seq)  # (B, n, 5d)

    def interest(self, seq: torch.Tensor, seq_mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """seq (B, L, 5d) behaviour embeddings, c (B, N, 5d) candidates -> (B, N, 5d)."""
        w_e, w_c = self.attn_in.weight.split(self.e_dim, dim=1)  # W₁ = [W_e | W_c]
        pe = F.linear(seq, w_e)  # (B, L, H)
        pc = F.linear(c, w_c, self.attn_in.bias)  # (B, N, H)
        b, n, hid = pc.shape
        if resolve_impl(self.attention, pc.device) == "fused":
            return self._attend(pe, pc, seq, seq_mask)  # no block to bound: one call
        per_cand = b * seq.shape[1] * hid
        chunk = max(1, self.attn_chunk_elems // max(1, per_cand))
        if chunk >= n:
            return self._attend(pe, pc, seq, seq_mask)
        recompute = torch.is_grad_enabled()
        out = []
        for start in range(0, n, chunk):  # blocks of candidates, not one candidate at a time
            part = pc[:, start : start + chunk]
            if recompute:
                out.append(checkpoint(self._attend, pe, part, seq, seq_mask, use_reentrant=False))
            else:
                out.append(self._attend(pe, part, seq, seq_mask))
        return torch.cat(out, dim=1)

    def forward(self, batch: CascadeBatch) -> torch.Tensor:
        n = batch.items.shape[1]
        usr = torch.cat(
            [
                self.emb.embed(batch.user, schema.USER_FIELDS),
                self.emb.embed(batch.context, schema.CONTEXT_FIELDS),
            ],
            dim=-1,
        )  # (B, 8d)
        seq = self.emb.embed(batch.seq, schema.SEQ_FIELDS)  # (B, L, 5d)
        c = self.emb.embed(batch.items[..., : len(_CAND_FIELDS)], _CAND_FIELDS)  # (B, N, 5d)
        up = self.emb.embed(batch.items[..., len(_CAND_FIELDS) :], _UPLOAD_FIELDS)  # (B, N, 3d)
        interest = self.interest(seq, batch.seq_mask, c)  # (B, N, 5d)
        x = torch.cat([usr.unsqueeze(1).expand(-1, n, -1), interest, c, up], dim=-1)  # (B,N,21d)
        return self.scorer(x).squeeze(-1)  # (B, N)
