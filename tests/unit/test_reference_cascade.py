"""The adapter that feeds raytopk's evaluation batches to the reference code's models
(raytopk.bench.reference_cascade) and jobs/compare_reference.py's checkpoint pick.

The reference itself is not needed (nor present in CI): a stand-in model with the reference's
forward signature checks the encoding and the chunking, which are what this repository owns.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from raytopk.bench.reference_cascade import (
    CATE1_PAD_ITEM,
    ReferenceCascade,
    ReferenceScorer,
    import_reference_models,
    reference_inputs,
)
from raytopk.data import schema
from raytopk.data.batch import random_batch

ROOT = Path(__file__).resolve().parents[2]
C1 = schema.ITEM_FIELDS.index("category_level_one")
S1 = schema.SEQ_FIELDS.index("category_level_one")


def _batch(b: int, n: int, seed: int = 0):
    seq_mask = torch.rand(b, schema.SEQ_LEN, generator=torch.Generator().manual_seed(seed)) > 0.4
    seq_mask[0] = False  # an empty history
    return random_batch(b, n, seed=seed, seq_mask=seq_mask)


def test_inputs_encode_like_the_reference_loader():
    batch = _batch(4, 40)
    groups = [
        (batch.items[:, a : a + 10], batch.cand_mask[:, a : a + 10]) for a in range(0, 40, 10)
    ]
    inp = reference_inputs(batch, groups)
    assert len(inp) == 15
    for i in range(3):
        assert torch.equal(inp[i], batch.context[:, i])
    for i in range(5):
        assert torch.equal(inp[3 + i], batch.user[:, i])
    seq, seq_mask, seq_len = inp[8:11]
    m = batch.seq_mask
    assert torch.equal(seq_mask, m.long())
    assert seq_len.tolist() == m.sum(-1).clamp_min(1).tolist()  # max(len, 1); row 0 empty
    assert seq_len[0] == 1
    # category_level_one: raw id (stored − 1) at real behaviours, 0 at padding (never shifted).
    assert torch.equal(seq[..., S1][m], batch.seq[..., S1][m] - 1)
    assert (seq[..., S1][~m] == 0).all()
    other = [f for f in range(len(schema.SEQ_FIELDS)) if f != S1]
    assert torch.equal(seq[..., other][m], batch.seq[..., other][m])
    assert (seq[~m] == 0).all()
    items = torch.cat(inp[11:15], 1)
    valid = batch.cand_mask
    assert torch.equal(items[..., C1][valid], batch.items[..., C1][valid] - 1)
    assert (items[..., C1][~valid] == CATE1_PAD_ITEM).all()  # the reference's padding row
    keep = [f for f in range(len(schema.ITEM_FIELDS)) if f != C1]
    assert torch.equal(items[..., keep][valid], batch.items[..., keep][valid])
    assert (items[..., keep][~valid] == 0).all()
    assert batch.seq[..., S1][m].min() >= 1  # the input batch was not modified in place
    with pytest.raises(ValueError, match="4 candidate groups"):
        reference_inputs(batch, groups[:3])


class _StandIn(torch.nn.Module):
    """The reference's forward contract: 15 inputs, four groups of exactly ``width`` candidates,
    a ``.squeeze()`` on (B, p, 1); each candidate's score depends on its request and itself."""

    def __init__(self, width: int | None) -> None:
        super().__init__()
        self.width, self.calls = width, 0

    def forward_all_by_rank(self, inputs):
        self.calls += 1
        uid, seq_len = inputs[3], inputs[10]
        out = []
        for photos in inputs[11:15]:
            if self.width is not None:
                assert photos.shape[1] == self.width
            w = torch.arange(1, 9, dtype=torch.float64)
            s = (
                (photos.double() * w).sum(-1, keepdim=True)
                + uid[:, None, None]
                + 0.5 * seq_len[:, None, None]
            )
            out.append(s.squeeze())
        return tuple(out)


def _expected(batch):
    items = torch.cat(
        reference_inputs(
            batch,
            [(batch.items, batch.cand_mask)] + [(batch.items[:, :0], batch.cand_mask[:, :0])] * 3,
        )[11:12],
        1,
    )
    seq_len = batch.seq_mask.sum(-1).clamp_min(1)
    w = torch.arange(1, 9, dtype=torch.float64)
    return (items.double() * w).sum(-1) + batch.user[:, :1] + 0.5 * seq_len[:, None]


@pytest.mark.parametrize("b,n,width", [(3, 200, 10), (3, 200, 50), (2, 45, 10), (1, 40, 10)])
def test_scorer_chunks_reproduce_every_candidate(b, n, width):
    batch = _batch(b, n, seed=n + b)
    model = _StandIn(width)
    got = ReferenceScorer(model, group=width)(batch)
    assert got.shape == (b, n)
    torch.testing.assert_close(got, _expected(batch))
    assert model.calls == -(-n // (4 * width))


def test_cascade_scores_each_stage():
    batch = _batch(3, 80)
    cascade = ReferenceCascade(
        [ReferenceScorer(_StandIn(None), 20), ReferenceScorer(_StandIn(10), 10)]
    )
    r, p = cascade.scores(batch)
    torch.testing.assert_close(r, p)
    torch.testing.assert_close(r, _expected(batch))


def test_import_reference_models_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="models.py"):
        import_reference_models(tmp_path)


def _compare_cli():
    spec = importlib.util.spec_from_file_location(
        "compare_reference_cli", ROOT / "jobs" / "compare_reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_checkpoints_pick_the_last_day(tmp_path):
    cli = _compare_cli()
    tag = "tau-cascade-topk_dftopkjoint-1.0--bs-1024_lr-0.01_x-SN0"
    for d in (0, 1, 2, 10):
        for m in ("retrival", "prerank"):
            (tmp_path / f"{m}_{tag}_D{d}.pkl").write_bytes(b"")
    (tmp_path / f"retrival_{tag}_D11.pkl").write_bytes(b"")  # no pre-rank partner: not a pair
    r, p = cli.reference_checkpoints(tmp_path)
    assert r.name == f"retrival_{tag}_D10.pkl" and p.name == f"prerank_{tag}_D10.pkl"
    with pytest.raises(FileNotFoundError, match="retrival"):
        cli.reference_checkpoints(tmp_path / "nowhere")
