"""Data-path benchmark pieces: the Ray Data pipeline as training reads it, and the per-request
Python baseline it is compared with (how the authors' loader builds the same tensors).

The baseline: a torch ``Dataset`` whose ``__getitem__`` does per-request dictionary lookups into
the raw pickles (candidates by stage, behaviour sequence) and per-item rank-index lookups, a
``DataLoader`` (single process, like the pipeline's one consumer) with a collate that stacks the
rows and samples each request's negatives in a per-request loop (numpy ``choice`` over the
batch's other valid slots inside). Loading the pickles/feather into dicts is timed separately
(load_pickles_s), not counted. ``jobs/bench_data.py`` runs both side by side.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch

__all__ = [
    "SAMPLE_NUMS",
    "RawRecFlowDataset",
    "SamplingCollate",
    "bench_baseline",
    "bench_pipeline",
]

SAMPLE_NUMS = (0, 160)
STEADY_REPEATS = 3  # re-iterations of the same dataset after the first
_TZ_OFFSET_S = 8 * 3600  # Asia/Shanghai has no DST: a fixed offset is exact


def _time3(ts_s: np.ndarray) -> np.ndarray:
    """(..., 3) stored weekday/hour/minute of epoch seconds (Monday = 0, + 1 as stored)."""
    t = np.asarray(ts_s, dtype=np.int64) + _TZ_OFFSET_S
    days = t // 86400
    return np.stack([(days + 3) % 7 + 1, t % 86400 // 3600 + 1, t % 3600 // 60 + 1], axis=-1)


class RawRecFlowDataset(Dataset):
    """The per-request baseline: one request per ``__getitem__``, from the raw layout's dicts."""

    def __init__(self, raw: Path, day: str) -> None:
        import pyarrow.feather as feather

        t = feather.read_table(raw / "all_stage" / f"{day}.feather").to_pandas()
        first = t.drop_duplicates("request_id")
        # request -> (timestamp, user fields); (request, video) -> rank_index, as dicts
        self.req = {
            int(r.request_id): (int(r.request_timestamp), [int(getattr(r, f)) for f in
                                                           schema.USER_FIELDS])
            for r in first.itertuples(index=False)
        }
        rp = t[t["rank_pos"] == 1]
        self.rank_index = dict(
            zip(zip(rp["request_id"].tolist(), rp["video_id"].tolist()), rp["rank_index"].tolist())
        )
        with open(raw / "request_id_dict" / f"{day}.pkl", "rb") as f:
            self.stages = pickle.load(f)
        with open(raw / "seq_effective_50_dict" / f"{day}.pkl", "rb") as f:
            self.seqs = pickle.load(f)
        self.ids = sorted(self.req)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rid = self.ids[i]
        ts, user = self.req[rid]
        seq = self.seqs.get(rid)
        if seq is None:
            seq = np.zeros((schema.SEQ_LEN, len(schema.RAW_SEQ_FIELDS)), dtype=np.int64)
        seq_mask = seq[:, schema.RAW_SEQ_FIELDS.index("time_ms")] != 0
        seq_ids = np.where(seq_mask[:, None], seq[:, :5] + 1, 0)  # the 5 SEQ_FIELDS, stored
        items = np.zeros((schema.N_OWN, len(schema.ITEM_FIELDS)), dtype=np.int64)
        mask = np.zeros(schema.N_OWN, dtype=bool)
        prio = np.zeros(schema.N_OWN, dtype=np.float32)
        st = self.stages.get(rid, {})
        f = schema.RAW_STAGE_ITEM_FIELDS
        for g, stage in enumerate(schema.CAND_GROUPS):
            arr = st.get(stage)
            if arr is None or len(arr) == 0:
                continue
            for j, row in enumerate(arr[: schema.GROUP_SIZE]):  # per item, as the authors do
                s = g * schema.GROUP_SIZE + j
                items[s, :5] = [
                    row[f.index("video_id")] + 1,
                    row[f.index("author_id")] + 1,
                    row[f.index("category_level_two")] + 1,
                    row[f.index("category_level_one")] + 1,
                    row[f.index("upload_type")] + 1,
                ]
                items[s, 5:] = _time3(np.asarray(row[f.index("upload_timestamp")]))
                mask[s] = True
                if stage == "rank_pos":
                    ri = self.rank_index.get((rid, int(row[0])), schema.GROUP_SIZE)
                    prio[s] = schema.RANK_POS_BASE - ri
                else:
                    prio[s] = schema.GROUP_PRIORITY[stage]
        return {
            "context": _time3(np.asarray(ts // 1000)),
            "user": np.asarray(user, dtype=np.int64) + 1,
            "seq": seq_ids.astype(np.int64),
            "seq_mask": seq_mask,
            "items": items,
            "cand_mask": mask,
            "priority": prio,
            "request_id": np.asarray(rid, dtype=np.int64),
        }


class SamplingCollate:
    """DataLoader collate: stack rows, then sample each request's negatives in a Python loop."""

    def __init__(self, sample_num: int, seed: int) -> None:
        self.n, self.rng = sample_num, np.random.default_rng(seed)

    def __call__(self, rows: list[dict[str, np.ndarray]]) -> CascadeBatch:
        b = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if self.n:
            items, mask = b["items"], b["cand_mask"]
            new_items = np.zeros((len(rows), self.n, items.shape[-1]), dtype=np.int64)
            new_mask = np.zeros((len(rows), self.n), dtype=bool)
            flat = items.reshape(-1, items.shape[-1])  # (B*40, F)
            valid = np.flatnonzero(mask.ravel())  # flat slots of the batch's valid candidates
            row_of = valid // items.shape[1]
            for i in range(len(rows)):  # per request (numpy inside, the loop is per request)
                pool = valid[row_of != i]
                take = self.rng.choice(pool, size=min(self.n, pool.size), replace=False)
                new_items[i, : take.size] = flat[take]
                new_mask[i, : take.size] = True
            b["items"] = np.concatenate([items, new_items], 1)
            b["cand_mask"] = np.concatenate([mask, new_mask], 1)
            b["priority"] = np.concatenate(
                [b["priority"], np.zeros((len(rows), self.n), np.float32)], 1
            )
        return CascadeBatch(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()})


def bench_baseline(raw: Path, day: str, sample_num: int, batch_size: int, limit: int) -> dict:
    """The per-request baseline over one raw day (``limit`` > 0: its first requests only)."""
    t0 = time.perf_counter()
    ds = RawRecFlowDataset(raw, day)
    load_s = time.perf_counter() - t0
    if limit:
        ds.ids = ds.ids[:limit]
    dl = DataLoader(ds, batch_size=batch_size, collate_fn=SamplingCollate(sample_num, 0))
    t0 = time.perf_counter()
    n = 0
    for batch in dl:
        n += batch.batch_size
    s = time.perf_counter() - t0
    return {"requests": n, "seconds": s, "requests_per_s": n / s, "load_pickles_s": load_s,
            "num_candidates": int(batch.num_candidates)}


def bench_pipeline(out: Path, day: str, sample_num: int, batch_size: int) -> dict:
    """The training pipeline on one day: ``build_train_dataset`` read through the iterator
    training uses (``CascadeBatches``); "first" = a new dataset's first iteration (planning,
    reading, the within-day sort), "steady" = the median of re-iterations."""
    from raytopk.data.loader import CascadeBatches
    from raytopk.data.pipeline import build_train_dataset

    ds = build_train_dataset(out, [day], sample_num=sample_num, batch_size=batch_size, seed=0)
    res: dict[str, Any] = {}
    steady = []
    for it in range(1 + STEADY_REPEATS):
        t0 = time.perf_counter()
        n = 0
        for batch in CascadeBatches(ds, batch_size):
            n += batch.batch_size
        s = time.perf_counter() - t0
        if it == 0:
            res["first"] = {"requests": n, "seconds": s, "requests_per_s": n / s}
        else:
            steady.append(s)
    s = float(np.median(steady))  # median of the re-iterations: the machine is shared
    res["steady"] = {"requests": n, "seconds": s, "requests_per_s": n / s, "all_seconds": steady}
    res["num_candidates"] = int(batch.num_candidates)
    # what one request costs in Ray's object store after sampling (ids carried narrow)
    nb = ds.take_batch(batch_size, batch_format="numpy")
    res["carried_bytes_per_request"] = sum(v.nbytes for v in nb.values()) / len(nb["request_id"])
    res["carried_dtypes"] = sorted({str(v.dtype) for v in nb.values()})
    return res
