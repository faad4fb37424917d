"""In-batch negative sampling (raytopk.data.sampling) and collate (raytopk.data.batch), no Ray."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch, collate
from raytopk.data.sampling import sample_negatives

N0 = schema.N_OWN


def _batch(b: int, *, valid_per_row: list[int] | None = None, seed: int = 0) -> dict:
    """A converted-layout numpy batch whose candidate ids encode (row, slot): 1000 * row + slot + 1.

    Masked slots hold 0 features and priority 0, as the converter writes them.
    """
    rng = np.random.default_rng(seed)
    if valid_per_row is None:
        mask = rng.random((b, N0)) < 0.7
    else:
        mask = np.zeros((b, N0), dtype=bool)
        for i, v in enumerate(valid_per_row):
            mask[i, rng.choice(N0, size=v, replace=False)] = True
    rows, slots = np.meshgrid(np.arange(b), np.arange(N0), indexing="ij")
    code = (1000 * rows + slots + 1).astype(np.int64)
    out: dict[str, np.ndarray] = {schema.REQUEST_ID: np.arange(b, dtype=np.int64) + 7}
    for f in schema.CONTEXT_FIELDS + schema.USER_FIELDS:
        out[f] = rng.integers(1, 5, size=b, dtype=np.int64)
    for f in schema.SEQ_FIELDS:
        out[schema.seq_col(f)] = rng.integers(0, 9, size=(b, schema.SEQ_LEN), dtype=np.int64)
    out[schema.SEQ_MASK] = rng.random((b, schema.SEQ_LEN)) < 0.5
    for k, f in enumerate(schema.ITEM_FIELDS):
        out[schema.cand_col(f)] = np.where(mask, code * 10 + k, 0)
    out[schema.CAND_MASK] = mask
    out[schema.CAND_PRIORITY] = np.where(mask, rng.integers(5, 31, size=(b, N0)), 0).astype(
        np.float32
    )
    return out


def _decode(vid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    code = vid // 10
    return (code - 1) // 1000, (code - 1) % 1000  # row, slot


@pytest.mark.parametrize("b,n", [(64, 0), (64, 16), (64, 160), (5, 12), (3, 100)])
def test_shapes_and_own_slots_unchanged(b: int, n: int) -> None:
    batch = _batch(b)
    out = sample_negatives(batch, n, np.random.default_rng(1))
    for c in schema.CAND_COLUMNS:
        assert out[c].shape == (b, N0 + n), c
        np.testing.assert_array_equal(out[c][:, :N0], batch[c])
        assert out[c].dtype == batch[c].dtype, c
    for c in set(batch) - set(schema.CAND_COLUMNS):  # non-candidate columns pass through
        assert out[c] is batch[c]


@pytest.mark.parametrize("b,n", [(64, 16), (64, 160), (4, 60)])  # sparse, sparse, dense
def test_sampled_slots_are_distinct_valid_slots_of_other_rows(b: int, n: int) -> None:
    batch = _batch(b, seed=3)
    out = sample_negatives(batch, n, np.random.default_rng(2))
    new_mask = out[schema.CAND_MASK][:, N0:]
    assert new_mask.all()  # pools are large enough here: every sampled slot is a real item
    np.testing.assert_array_equal(out[schema.CAND_PRIORITY][:, N0:], 0.0)
    rows, slots = _decode(out[schema.cand_col("video_id")][:, N0:])  # (B, n)
    assert (rows != np.arange(b)[:, None]).all(), "a request sampled its own slot"
    assert batch[schema.CAND_MASK][rows, slots].all(), "a padded slot was sampled"
    for i in range(b):  # without replacement
        assert len(set(zip(rows[i].tolist(), slots[i].tolist()))) == n
    # every feature of a sampled slot comes from the same source slot (gathered together)
    for k, f in enumerate(schema.ITEM_FIELDS):
        np.testing.assert_array_equal(out[schema.cand_col(f)][:, N0:] % 10, k)
        np.testing.assert_array_equal(
            out[schema.cand_col(f)][:, N0:] // 10, out[schema.cand_col("video_id")][:, N0:] // 10
        )


def test_deterministic_for_a_seed_and_varies_with_it() -> None:
    batch = _batch(32)
    a = sample_negatives(batch, 40, np.random.default_rng(5))
    b = sample_negatives(batch, 40, np.random.default_rng(5))
    c = sample_negatives(batch, 40, np.random.default_rng(6))
    for col in schema.CAND_COLUMNS:
        np.testing.assert_array_equal(a[col], b[col])
    vid = schema.cand_col("video_id")
    assert not np.array_equal(a[vid], c[vid])


@pytest.mark.parametrize("n", [4, 100])  # 4: sparse sampler, 100 (pool 36): dense sampler
def test_uniform_over_the_other_rows_valid_slots(n: int) -> None:
    """Each eligible slot's inclusion frequency is n / |pool| (binomial, 6 sigma)."""
    batch = _batch(4, valid_per_row=[9, 9, 9, 9], seed=11)
    pool = 27  # valid slots of the three other rows
    trials = 3000
    n_eff = min(n, pool)
    counts = np.zeros((4, N0), dtype=np.int64)  # how often row 0 drew (row r, slot s)
    rng = np.random.default_rng(0)
    for _ in range(trials):
        out = sample_negatives(batch, n, rng)
        ok = out[schema.CAND_MASK][0, N0:]
        rows, slots = _decode(out[schema.cand_col("video_id")][0, N0:][ok])
        np.add.at(counts, (rows, slots), 1)
    freq = counts[batch[schema.CAND_MASK]].reshape(4, 9)[1:] / trials  # (3, 9)
    p = n_eff / pool
    tol = 6 * math.sqrt(max(p * (1 - p), 1e-12) / trials) + 1e-9
    assert np.abs(freq - p).max() <= tol
    assert counts[0].sum() == 0  # never its own row


def test_small_pool_fills_what_exists_and_masks_the_rest() -> None:
    batch = _batch(3, valid_per_row=[2, 3, 0], seed=4)
    out = sample_negatives(batch, 6, np.random.default_rng(0))
    mask = out[schema.CAND_MASK][:, N0:]
    assert mask.sum(axis=1).tolist() == [3, 2, 5]  # |other rows' valid slots|, capped at 6
    for i in range(3):  # real samples first, then padding with 0 features and priority 0
        k = int(mask[i].sum())
        assert mask[i, :k].all() and not mask[i, k:].any()
    for f in schema.ITEM_FIELDS:
        col = out[schema.cand_col(f)][:, N0:]
        assert (col[~mask] == 0).all() and (col[mask] > 0).all()
    assert (out[schema.CAND_PRIORITY][:, N0:] == 0).all()
    rows, _ = _decode(out[schema.cand_col("video_id")][:, N0:])
    assert (rows[mask] != np.nonzero(mask)[0]).all()


def test_group_without_valid_slots() -> None:
    batch = _batch(2, valid_per_row=[0, 0])
    out = sample_negatives(batch, 3, np.random.default_rng(0))
    assert out[schema.CAND_MASK].shape == (2, N0 + 3) and not out[schema.CAND_MASK].any()


def test_rejects_bad_arguments() -> None:
    batch = _batch(2)
    with pytest.raises(ValueError, match="sample_num"):
        sample_negatives(batch, -1, np.random.default_rng(0))
    with pytest.raises(TypeError, match="sample_num"):
        sample_negatives(batch, 2.0, np.random.default_rng(0))  # type: ignore[arg-type]
    del batch[schema.CAND_PRIORITY]
    with pytest.raises(ValueError, match=schema.CAND_PRIORITY):
        sample_negatives(batch, 2, np.random.default_rng(0))
    batch = _batch(2)
    batch[schema.cand_col("author_id")] = batch[schema.cand_col("author_id")][:, :5]
    with pytest.raises(ValueError, match="cand_author_id"):
        sample_negatives(batch, 2, np.random.default_rng(0))


def test_collate_shapes_dtypes_and_order() -> None:
    b, n = 6, 10
    batch = sample_negatives(_batch(b), n, np.random.default_rng(0))
    cb = collate(batch)
    assert isinstance(cb, CascadeBatch)
    assert cb.context.shape == (b, 3) and cb.context.dtype == torch.int64
    assert cb.user.shape == (b, 5) and cb.user.dtype == torch.int64
    assert cb.seq.shape == (b, schema.SEQ_LEN, 5) and cb.seq.dtype == torch.int64
    assert cb.seq_mask.shape == (b, schema.SEQ_LEN) and cb.seq_mask.dtype == torch.bool
    assert cb.items.shape == (b, N0 + n, 8) and cb.items.dtype == torch.int64
    assert cb.cand_mask.shape == (b, N0 + n) and cb.cand_mask.dtype == torch.bool
    assert cb.priority.shape == (b, N0 + n) and cb.priority.dtype == torch.float32
    assert cb.request_id.shape == (b,) and cb.request_id.dtype == torch.int64
    assert cb.batch_size == b and cb.num_candidates == N0 + n
    for k, f in enumerate(schema.ITEM_FIELDS):  # last dim of items follows schema.ITEM_FIELDS
        np.testing.assert_array_equal(cb.items[..., k].numpy(), batch[schema.cand_col(f)])
    for k, f in enumerate(schema.USER_FIELDS):
        np.testing.assert_array_equal(cb.user[:, k].numpy(), batch[f])
    for k, f in enumerate(schema.SEQ_FIELDS):
        np.testing.assert_array_equal(cb.seq[..., k].numpy(), batch[schema.seq_col(f)])
    np.testing.assert_array_equal(cb.priority.numpy(), batch[schema.CAND_PRIORITY])
    np.testing.assert_array_equal(cb.request_id.numpy(), batch[schema.REQUEST_ID])


def test_collate_accepts_read_only_arrays_and_names_bad_columns() -> None:
    batch = _batch(3)
    for v in batch.values():
        v.flags.writeable = False
    cb = collate(batch)
    assert cb.priority.shape == (3, N0)
    bad = dict(batch)
    del bad[schema.SEQ_MASK]
    with pytest.raises(ValueError, match=schema.SEQ_MASK):
        collate(bad)
    bad = dict(batch)
    bad[schema.CAND_MASK] = np.empty(3, dtype=object)
    with pytest.raises(ValueError, match=schema.CAND_MASK):
        collate(bad)


def test_storage_types_are_the_narrowest_that_hold_each_vocab() -> None:
    from raytopk.data.pipeline import storage_types

    sizes = [9, 256, 257, 65536, 65537, 2**32, 2**32 + 1]
    tables = sorted(set(schema.EMBEDDING_TABLE.values()))
    vocab = {t: sizes[i % len(sizes)] for i, t in enumerate(tables)}
    want = {
        9: pa.uint8(), 256: pa.uint8(), 257: pa.uint16(), 65536: pa.uint16(),
        65537: pa.uint32(), 2**32: pa.uint32(), 2**32 + 1: pa.int64(),
    }
    types = storage_types(vocab)
    for col, t in types.items():
        field = col.removeprefix("cand_").removeprefix("seq_")
        assert t == want[vocab[schema.EMBEDDING_TABLE[field]]], col
    untouched = {schema.REQUEST_ID, schema.SEQ_MASK, schema.CAND_MASK, schema.CAND_PRIORITY}
    assert set(types) == set(schema.REQUEST_COLUMNS) - untouched
    with pytest.raises(ValueError, match="video_id"):
        storage_types({k: v for k, v in vocab.items() if k != "video_id"})


def _arrow(batch: dict[str, np.ndarray]) -> pa.Table:
    cols = {}
    for k, v in batch.items():
        if v.ndim == 2:
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
        else:
            cols[k] = pa.array(v)
    return pa.table(cols)


def test_narrow_ids_give_the_same_groups_and_batches_as_int64() -> None:
    from raytopk.data.pipeline import narrow, prepare_group, storage_types

    batch = _batch(40)  # candidate ids up to ~4e5: uint32
    vocab = {t: 2**20 for t in set(schema.EMBEDDING_TABLE.values())}

    table = _arrow(batch)
    small = narrow(table, storage_types(vocab))
    assert small.schema.field(schema.cand_col("video_id")).type == pa.list_(pa.uint32(), N0)
    assert small.schema.field(schema.REQUEST_ID).type == pa.int64()
    wide = prepare_group(table, sample_num=30, seed=1)
    thin = prepare_group(small, sample_num=30, seed=1)
    assert thin[schema.cand_col("video_id")].dtype == np.uint32
    assert thin[schema.cand_col("video_id")].nbytes * 2 == wide[schema.cand_col("video_id")].nbytes
    a, b = collate(wide), collate(thin)
    for f in ("context", "user", "seq", "seq_mask", "items", "cand_mask", "priority",
              "request_id"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    assert b.items.dtype == torch.int64 and b.items.shape == (40, N0 + 30, 8)
    # an id that does not fit the vocabulary's type is an error naming the column
    tiny = {t: 200 for t in set(schema.EMBEDDING_TABLE.values())}
    with pytest.raises(ValueError, match="cand_"):
        narrow(table, storage_types(tiny))
