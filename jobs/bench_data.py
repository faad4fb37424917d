"""Data path benchmark: conversion, the Ray Data pipeline, and a per-request Python baseline.

    python jobs/bench_data.py [--quick] [--out runs/bench_data] [--requests-per-day R] [--days D]

Measured side by side in one run on the same freshly generated synthetic days:
1. conversion (raw RecFlow layout -> parquet, ``raytopk.data.convert.convert``), requests/s;
2. the pipeline (``build_dataset`` -> ``iter_batches`` -> ``CascadeBatch``, split="train") with
   sample_num in {0, 160}, requests/s; "first" = the first iteration of a new dataset (includes
   planning, reading, the within-day sort), "steady" = a second iteration of the same dataset;
3. the baseline: how the authors' loader builds the same tensors: a torch ``Dataset`` whose
   ``__getitem__`` does per-request dictionary lookups into the raw pickles (candidates by stage,
   behaviour sequence) and per-item rank-index lookups, a ``DataLoader`` (single process, like
   the pipeline's one consumer) with a collate that stacks the rows and samples each request's
   negatives in a per-request loop (numpy ``choice`` over the batch's other valid slots inside).
   Loading the pickles/feather into dicts is timed separately (load_pickles_s), not counted.
Ratios pipeline / baseline are reported for the same sample_num. Writes bench_data.json (figures,
machine, versions) to --out. Local Ray with 2 CPUs (ray.init(num_cpus=2), 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

for _k, _v in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from raytopk.data import schema  # noqa: E402
from raytopk.data.batch import CascadeBatch  # noqa: E402

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
    from raytopk.data.pipeline import build_dataset, iter_cascade_batches

    ds = build_dataset(out, [day], split="train", sample_num=sample_num, batch_size=batch_size,
                       seed=0)
    res: dict[str, Any] = {}
    steady = []
    for it in range(1 + STEADY_REPEATS):
        t0 = time.perf_counter()
        n = 0
        for batch in iter_cascade_batches(ds, batch_size):
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


def machine() -> dict:
    import pyarrow
    import ray

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
        "ray": ray.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 days x 10k requests (about a minute); same batch size as the full run")
    p.add_argument("--days", type=int, default=None, help="synthetic days to generate")
    p.add_argument("--requests-per-day", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--baseline-limit", type=int, default=0,
                   help="cap the baseline's requests (0 = the whole day)")
    p.add_argument("--out", default="runs/bench_data")
    p.add_argument("--workdir", default=None, help="where to generate data (default: a tmp dir)")
    args = p.parse_args(argv)
    days = args.days or (2 if args.quick else 4)
    # quick keeps the protocol's batch (1024): a smaller one changes the per-batch costs of both
    # sides, and a day of 10k requests still gives the pipeline ~10 sampling groups per epoch
    rpd = args.requests_per_day or (10000 if args.quick else 20000)
    bs = args.batch_size

    import ray

    from raytopk.data.convert import convert
    from raytopk.data.synthetic import generate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    raw, out = work / "raw", work / "parquet"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    generate(raw, days=days, requests_per_day=rpd, seed=0)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    convert(raw, out)
    conv_s = time.perf_counter() - t0
    day = schema.FIRST_DAY
    result: dict[str, Any] = {
        "config": {"days": days, "requests_per_day": rpd, "batch_size": bs, "quick": args.quick},
        "machine": machine(),
        "generate": {"seconds": gen_s, "requests_per_s": days * rpd / gen_s},
        "conversion": {"seconds": conv_s, "requests_per_s": days * rpd / conv_s},
        "pipeline": {},  # "first": a new dataset's first iteration; "steady": median re-run
        "baseline": {},
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local",
             object_store_memory=512 * 1024**2)
    try:
        # warm-up: Ray starts its worker processes on the first execution; keep that out of
        # whichever sample_num would be measured first
        bench_pipeline(out, day, 0, bs)
        for n in SAMPLE_NUMS:
            result["pipeline"][str(n)] = bench_pipeline(out, day, n, bs)
    finally:
        ray.shutdown()
    for n in SAMPLE_NUMS:
        result["baseline"][str(n)] = bench_baseline(raw, day, n, bs, args.baseline_limit)
    result["ratio_steady_over_baseline"] = {
        str(n): result["pipeline"][str(n)]["steady"]["requests_per_s"]
        / result["baseline"][str(n)]["requests_per_s"]
        for n in SAMPLE_NUMS
    }
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)

    rows = [("conversion (raw -> parquet)", result["conversion"]["requests_per_s"], "")]
    for n in SAMPLE_NUMS:
        pl, bl = result["pipeline"][str(n)], result["baseline"][str(n)]
        rows += [
            (f"pipeline n={n} first iteration", pl["first"]["requests_per_s"],
             f"{pl['carried_bytes_per_request']:,.0f} B/request carried"),
            (f"pipeline n={n} steady", pl["steady"]["requests_per_s"],
             f"{result['ratio_steady_over_baseline'][str(n)]:.1f}x baseline"),
            (f"per-request baseline n={n}", bl["requests_per_s"], ""),
        ]
    m = result["machine"]
    print(f"\n{days} synthetic day(s) x {rpd} requests, batch {bs}, {m['processor']} "
          f"{m['cpu_count']} CPU(s), ray {m['ray']}")
    print(f"{'measure':<34}{'requests/s':>14}  note")
    for name, v, note in rows:
        print(f"{name:<34}{v:>14,.0f}  {note}")
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bench_data.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {dest / 'bench_data.json'}")
    return result


if __name__ == "__main__":
    main()
