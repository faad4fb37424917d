"""random_batch: a valid random CascadeBatch (ids inside the vocabulary, padding = 0 where masked,
docs/protocol.md §4.3 priorities), deterministic in its seed."""

from __future__ import annotations

import pytest
import torch

from raytopk.data import schema
from raytopk.data.batch import random_batch

VOCAB = {t: 30 for t in set(schema.EMBEDDING_TABLE.values())} | {"video_id": 7}


def _check_ids(ids: torch.Tensor, fields: tuple[str, ...], valid: torch.Tensor | None) -> None:
    for i, f in enumerate(fields):
        col = ids[..., i]
        rows = VOCAB[schema.EMBEDDING_TABLE[f]]
        ok = col[valid] if valid is not None else col
        assert ok.min() >= 1 and ok.max() < rows, f
        if valid is not None:
            assert (col[~valid] == 0).all(), f


def test_random_batch_is_valid() -> None:
    b, n = 6, 47
    batch = random_batch(b, n, VOCAB, seed=3)
    assert batch.batch_size == b and batch.num_candidates == n
    assert batch.seq.shape == (b, schema.SEQ_LEN, len(schema.SEQ_FIELDS))
    assert batch.items.shape == (b, n, len(schema.ITEM_FIELDS))
    assert batch.cand_mask.dtype == batch.seq_mask.dtype == torch.bool
    assert batch.priority.dtype == torch.float32 and batch.items.dtype == torch.int64
    assert batch.cand_mask.any() and not batch.cand_mask.all()
    assert batch.seq_mask.any() and not batch.seq_mask.all()
    _check_ids(batch.context, schema.CONTEXT_FIELDS, None)
    _check_ids(batch.user, schema.USER_FIELDS, None)
    _check_ids(batch.seq, schema.SEQ_FIELDS, batch.seq_mask)
    _check_ids(batch.items, schema.ITEM_FIELDS, batch.cand_mask)
    # docs/protocol.md §4.3 priorities by slot; 0 at masked slots.
    p, m = batch.priority, batch.cand_mask
    assert (p[~m] == 0).all()
    full = random_batch(b, n, VOCAB, seed=3, mask=torch.ones(b, n, dtype=torch.bool)).priority
    for r in range(b):
        assert sorted(full[r, :10].tolist()) == [float(v) for v in range(21, 31)]
    assert (full[:, 10:20] == 7).all() and (full[:, 20:30] == 6).all()
    assert (full[:, 30:40] == 5).all() and (full[:, 40:] == 0).all()
    assert torch.equal(torch.arange(b), batch.request_id)


def test_random_batch_seed_and_overrides() -> None:
    a, a2, c = random_batch(4, 9, seed=1), random_batch(4, 9, seed=1), random_batch(4, 9, seed=2)
    for name in ("context", "user", "seq", "seq_mask", "items", "cand_mask", "priority"):
        assert torch.equal(getattr(a, name), getattr(a2, name)), name
    assert not torch.equal(a.items, c.items)
    prio = torch.rand(2, 5, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, False, True, False, False]])
    seq_mask = torch.zeros(2, 3, dtype=torch.bool)
    batch = random_batch(2, 5, priority=prio, mask=mask, seq_mask=seq_mask)
    assert batch.priority is prio and batch.cand_mask is mask and batch.seq.shape == (2, 3, 5)
    assert (batch.seq == 0).all() and (batch.items[1, 1] == 0).all()
    with pytest.raises(ValueError, match=r"'mask' should be a bool tensor of shape \(2, 5\)"):
        random_batch(2, 5, mask=mask.float())
    with pytest.raises(ValueError, match=r"'priority' should be a tensor of shape \(3, 5\)"):
        random_batch(3, 5, priority=prio)
    with pytest.raises(ValueError, match="'num_candidates' should be an int >= 1 but got 0"):
        random_batch(2, 0)
    with pytest.raises(ValueError, match="'vocab' is missing table 'hour'"):
        random_batch(2, 5, {k: v for k, v in VOCAB.items() if k != "hour"})
