"""Data path benchmark: conversion, the Ray Data pipeline, and a per-request Python baseline.

    python jobs/bench_data.py [--quick] [--out runs/bench_data] [--requests-per-day R] [--days D]

Measured side by side in one run on the same freshly generated synthetic days:
1. conversion (raw RecFlow layout -> parquet, ``raytopk.data.convert.convert``), requests/s;
2. the pipeline as training reads it (``build_train_dataset`` -> ``CascadeBatches``) with
   sample_num in {0, 160}, requests/s; "first" = the first iteration of a new dataset (includes
   planning, reading, the within-day sort), "steady" = the median re-iteration of the same one;
3. the per-request baseline (``raytopk.bench.data``): how the authors' loader builds the same
   tensors, per request in Python.
Ratios pipeline / baseline are reported for the same sample_num. Writes bench_data.json (figures,
machine, versions) to --out. Local Ray with 2 CPUs (``init_ray(num_cpus=2)``, token auth on).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytopk.bench.data import SAMPLE_NUMS, bench_baseline, bench_pipeline  # noqa: E402
from raytopk.bench.machine import machine_info  # noqa: E402
from raytopk.data import schema  # noqa: E402


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
    from raytopk.ray_env import init_ray

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
        "machine": machine_info("cpu"),
        "generate": {"seconds": gen_s, "requests_per_s": days * rpd / gen_s},
        "conversion": {"seconds": conv_s, "requests_per_s": days * rpd / conv_s},
        "pipeline": {},  # "first": a new dataset's first iteration; "steady": median re-run
        "baseline": {},
    }
    init_ray(num_cpus=2, log_to_driver=False, address="local", object_store_memory=512 * 1024**2)
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
