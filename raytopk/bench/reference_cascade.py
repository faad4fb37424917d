"""The authors' trained cascade scored by raytopk's evaluation (docs/reference/README.md).

The paper's training code (github.com/zhangzhen97/DFTOPK, ``torch/deep_components``) trains a
retrieval ``DSSM`` and a pre-rank ``DIN`` (its ``models.py``) and saves their state dicts. To
compare its models with raytopk's under ONE evaluation, this module feeds raytopk's evaluation
batches (:class:`raytopk.data.batch.CascadeBatch`, N = 200 candidates) to those models in the
reference's own input encoding, so ``raytopk.train.evaluate.evaluate`` scores both sides on the
same requests, candidates and labels. Nothing of the reference is copied here: the caller imports
its ``models.py`` from a path (``import_reference_models``) and hands the modules in.

Notation: B = requests, N = candidates per request, L = sequence length (50), F = 8 item features.

Encoding (the reference's loader, ``dataset2.Rank_Train_All_BY_RANK_Dataset``, vs raytopk's stored
ids = raw + 1 with 0 = padding):
- context (weekday, hour, minute + 1) and user ids (raw + 1): identical. The reference takes the
  time features from ``time.localtime``, i.e. the machine's time zone: train it with
  ``TZ=Asia/Shanghai`` (schema.TIME_ZONE) or its time features differ from these.
- category_level_one is the one field it does NOT shift: raw id, embedding padding row 2. So
  ref = stored − 1 at valid sequence rows and valid candidate slots; a padded candidate slot is
  2 (its padding row); a padded sequence row is 0 (the reference pads sequences with zeros and
  never shifts them, so row 0 of its category_level_one table, a trained vector, enters its
  unmasked sequence mean once per padded row).
- every other item / sequence field: stored id, padding 0 (as the reference).
- seq_mask (int), seq_len = max(1, Σ mask) (the reference's divisor).
Candidates: the reference's ``forward_all_by_rank`` takes four groups; its DIN hard-codes groups
of 10 (``repeat_interleave(10)``), its DSSM takes any width. ``ReferenceScorer`` pads N with
padded slots up to a multiple of 4·group, calls the model once per 4·group candidates and cuts
the padding off again: every candidate's score depends only on its request and itself, so the
scores are exactly the model's. Its ``.squeeze()`` calls need B >= 2: a one-request batch is
scored twice over and the copy dropped.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch

__all__ = [
    "CATE1_PAD_ITEM",
    "ReferenceCascade",
    "ReferenceScorer",
    "import_reference_models",
    "reference_inputs",
]

CATE1_PAD_ITEM = 2  # the reference's category_level_one padding row (its candidate padding)
_CATE1 = schema.ITEM_FIELDS.index("category_level_one")
_SEQ_CATE1 = schema.SEQ_FIELDS.index("category_level_one")


def _items_ref(items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, n, 8) stored ids -> the reference's candidate encoding (padded slots: 0, cate1 2)."""
    out = torch.where(mask.unsqueeze(-1), items, torch.zeros_like(items))
    cat1 = torch.where(
        mask, items[..., _CATE1] - 1, torch.full_like(mask, CATE1_PAD_ITEM, dtype=items.dtype)
    )
    out[..., _CATE1] = cat1
    return out


def reference_inputs(
    batch: CascadeBatch, groups: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[Any]:
    """The 15 inputs of the reference's ``forward_all_by_rank`` for ``batch``'s request side and
    four candidate ``groups`` of (items (B, p, 8) stored ids, mask (B, p) bool)."""
    if len(groups) != 4:
        raise ValueError(f"the reference's forward takes 4 candidate groups, got {len(groups)}")
    ctx, usr = batch.context, batch.user
    m = batch.seq_mask
    seq = torch.where(m.unsqueeze(-1), batch.seq, torch.zeros_like(batch.seq))
    seq[..., _SEQ_CATE1] = torch.where(
        m, batch.seq[..., _SEQ_CATE1] - 1, torch.zeros_like(seq[..., 0])
    )
    seq_len = m.sum(-1).clamp_min(1)  # the reference's max(seq_len, 1)
    return [
        ctx[:, 0], ctx[:, 1], ctx[:, 2],
        usr[:, 0], usr[:, 1], usr[:, 2], usr[:, 3], usr[:, 4],
        seq, m.to(torch.int64), seq_len,
        *[_items_ref(items, mask) for items, mask in groups],
    ]  # fmt: skip


class ReferenceScorer(nn.Module):
    """``forward(batch) -> (B, N)`` scores of one reference model (``forward_all_by_rank``).

    Args:
        model: the reference's DSSM or DIN with its trained state loaded.
        group: candidates per group its forward accepts (10 for its DIN; any for its DSSM).
    """

    def __init__(self, model: nn.Module, group: int = 10) -> None:
        super().__init__()
        if group < 1:
            raise ValueError(f"'group' should be >= 1 but got {group}")
        self.model, self.group = model, int(group)

    def forward(self, batch: CascadeBatch) -> torch.Tensor:
        B, N, F = batch.items.shape
        if B == 1:  # the reference squeezes (B, p, 1): score a duplicated row, keep one
            two = CascadeBatch(**{k: torch.cat([v, v]) for k, v in vars(batch).items()})
            return self.forward(two)[:1]
        chunk = 4 * self.group
        n_pad = -N % chunk
        items = torch.cat([batch.items, batch.items.new_zeros(B, n_pad, F)], 1)
        mask = torch.cat([batch.cand_mask, batch.cand_mask.new_zeros(B, n_pad)], 1)
        out = []
        for lo in range(0, N + n_pad, chunk):
            groups = [
                (items[:, a : a + self.group], mask[:, a : a + self.group])
                for a in range(lo, lo + chunk, self.group)
            ]
            logits = self.model.forward_all_by_rank(reference_inputs(batch, groups))
            out.append(torch.cat([x.reshape(B, self.group) for x in logits], 1))
        return torch.cat(out, 1)[:, :N]


class ReferenceCascade(nn.Module):
    """What ``raytopk.train.evaluate.evaluate`` needs of a cascade: ``scorers`` and ``scores``."""

    def __init__(self, scorers: list[nn.Module]) -> None:
        super().__init__()
        self.scorers = nn.ModuleList(scorers)

    def scores(self, batch: CascadeBatch) -> list[torch.Tensor]:
        return [s(batch) for s in self.scorers]


def import_reference_models(reference_dir: str | Path) -> ModuleType:
    """The reference's ``models`` module from ``reference_dir`` (its ``torch/`` folder, which
    holds ``deep_components/models.py``); FileNotFoundError naming the path when absent."""
    d = Path(reference_dir) / "deep_components"
    if not (d / "models.py").is_file():
        raise FileNotFoundError(
            f"{str(d / 'models.py')!r} not found: pass the reference's torch/ folder "
            "(e.g. git archive of github.com/zhangzhen97/DFTOPK, then <that>/torch)"
        )
    for p in (str(d), str(d.parent)):
        if p not in sys.path:
            sys.path.insert(0, p)
    return importlib.import_module("models")
