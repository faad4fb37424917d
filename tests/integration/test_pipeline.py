"""The Ray Data pipeline (raytopk.data.pipeline) on a tiny synthetic dataset, local Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

DAYS = ["2024-01-13", "2024-01-14"]
REQ = 150  # requests per day
BS = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytopk.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("pipeline_data")
    return Path(prepare_synthetic(root, days=2, requests_per_day=REQ, seed=3))


def _raw_day(data: Path, day: str) -> dict[int, dict[str, np.ndarray]]:
    """request_id -> its converted row (own 40 slots), read with pyarrow only."""
    t = pq.read_table(sorted((data / "requests" / f"day={day}").glob("*.parquet")))
    d = t.to_pydict()
    return {
        rid: {c: np.asarray(d[c][i]) for c in schema.CAND_COLUMNS}
        for i, rid in enumerate(d[schema.REQUEST_ID])
    }


def _batches(ds: Any) -> list[CascadeBatch]:
    from raytopk.data.loader import CascadeBatches  # the iterator training reads with

    return list(CascadeBatches(ds, BS))


def test_train_split_order_rows_and_in_batch_negatives(ray_cluster: Any, data: Path) -> None:
    from raytopk.data.pipeline import build_train_dataset

    n = 24
    ds = build_train_dataset(data, DAYS[::-1], sample_num=n, batch_size=BS, seed=7)
    batches = _batches(ds)
    rid = np.concatenate([b.request_id.numpy() for b in batches])
    raw = [_raw_day(data, d) for d in DAYS]
    # every request exactly once, days in date order, shuffled within a day
    assert len(rid) == 2 * REQ and len(set(rid.tolist())) == 2 * REQ
    assert set(rid[:REQ].tolist()) == set(raw[0]) and set(rid[REQ:].tolist()) == set(raw[1])
    assert not np.array_equal(rid[:REQ], np.sort(rid[:REQ]))
    by_id = {**raw[0], **raw[1]}
    vid = schema.cand_col("video_id")
    for b in batches:
        assert b.items.shape[1:] == (schema.N_OWN + n, len(schema.ITEM_FIELDS))
        for i, r in enumerate(b.request_id.tolist()):  # own slots exactly as converted
            np.testing.assert_array_equal(b.items[i, : schema.N_OWN, 0].numpy(), by_id[r][vid])
            np.testing.assert_array_equal(
                b.priority[i, : schema.N_OWN].numpy(), by_id[r][schema.CAND_PRIORITY]
            )
        assert b.cand_mask[:, schema.N_OWN :].all()
        assert (b.priority[:, schema.N_OWN :] == 0).all()
    # sampled candidates are valid slots of *other* requests of the same sampling group: the
    # groups are the consecutive runs of BS requests (the last one smaller), i.e. the batches
    groups = [rid[s : s + BS] for s in range(0, len(rid), BS)]
    assert [len(g) for g in groups] == [b.batch_size for b in batches]
    items = np.concatenate([b.items.numpy() for b in batches])  # (2*REQ, N, F)
    pos = 0
    for g in groups:
        own = {int(r): _valid_items(by_id[int(r)]) for r in g}
        for j, r in enumerate(g):
            pool = set().union(*(own[o] for o in own if o != int(r)))
            sampled = [tuple(x) for x in items[pos + j, schema.N_OWN :].tolist()]
            assert set(sampled) <= pool, f"request {r}: a negative not from its batch"
        pos += len(g)


def _valid_items(row: dict[str, np.ndarray]) -> set[tuple]:
    feats = np.stack([row[schema.cand_col(f)] for f in schema.ITEM_FIELDS], axis=-1)  # (40, F)
    return {tuple(x) for x in feats[row[schema.CAND_MASK].astype(bool)].tolist()}


def test_deterministic_for_a_seed(ray_cluster: Any, data: Path) -> None:
    from raytopk.data.pipeline import build_train_dataset

    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        ds = build_train_dataset(data, DAYS[:1], sample_num=8, batch_size=BS, seed=seed)
        bs = _batches(ds)
        return (
            np.concatenate([b.request_id.numpy() for b in bs]),
            np.concatenate([b.items.numpy() for b in bs]),
        )

    r1, i1 = run(5)
    r2, i2 = run(5)
    r3, i3 = run(6)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(i1, i2)
    assert not np.array_equal(r1, r3)


def test_eval_dataset_uses_200_candidates_in_file_order(ray_cluster: Any, data: Path) -> None:
    from raytopk.data.pipeline import build_eval_dataset

    ds = build_eval_dataset(data, DAYS[1], batch_size=BS, seed=0)
    batches = _batches(ds)
    assert all(b.num_candidates == schema.N_EVAL == 200 for b in batches)
    rid = np.concatenate([b.request_id.numpy() for b in batches])
    t = pq.read_table(sorted((data / "requests" / f"day={DAYS[1]}").glob("*.parquet")))
    np.testing.assert_array_equal(rid, t.column(schema.REQUEST_ID).to_numpy())
    assert sum(b.cand_mask[:, schema.N_OWN :].sum().item() for b in batches) > 0


def test_missing_day_and_bad_path_name_the_culprit(
    ray_cluster: Any, data: Path, tmp_path: Path
) -> None:
    from raytopk.data.pipeline import build_eval_dataset, build_train_dataset, load_items

    with pytest.raises(ValueError, match="2024-03-01.*missing"):
        build_train_dataset(data, ["2024-03-01"], sample_num=0, batch_size=BS, seed=0)
    with pytest.raises(ValueError, match=str(tmp_path)):
        build_train_dataset(tmp_path, DAYS, sample_num=0, batch_size=BS, seed=0)
    with pytest.raises(ValueError, match="'sample_num' must be >= 0"):
        build_train_dataset(data, DAYS, sample_num=-1, batch_size=BS, seed=0)
    with pytest.raises(ValueError, match="'max_requests' must be >= 0"):
        build_eval_dataset(data, DAYS, batch_size=BS, seed=0, max_requests=-5)
    items = load_items(data)
    assert set(items) == set(schema.ITEM_TABLE_COLUMNS)
    assert all(v.dtype == np.int64 and v.shape == items["video_id"].shape for v in items.values())
