"""Training-throughput benchmark (targets: docs/protocol.md §5.3), side by side in one run.

    python jobs/bench_train.py [--requests-per-day 30000] [--batch-size 256]
    python jobs/bench_train.py --quick      # ~5 minutes on 2 cores: smaller day, fewer steps

1. Ray path: ``raytopk.train.driver.run`` with 1 worker (Ray Train V2 + Ray Data: parquet read,
   in-batch negative sampling and collation in Ray Data) over one synthetic day; steady-state
   samples/s = the report windows after the first one, and the data-wait fraction of step time.
2. Plain path: the same day's batches, produced by the same pipeline but materialised in memory
   first, fed to the same training loop in this process with no data pipeline and no reports
   (same model, operator, batch size, step and torch thread count as the Ray worker;
   ``raytopk.bench.train``). Target: Ray >= 0.8x plain, wait < 10%.
3. Operator sweep: samples/s of a training step (forward, loss, backward, Adam) for every
   registered operator at sample_num 0 and 160 (N = 40 and 200 candidates), plain loop - the
   input of the sample-scaling study. Points whose estimated memory (the operators' registry
   ``step_bytes``, times the two stages) exceeds --mem-budget-gb are recorded as skipped.

Writes ``bench_train.json`` (figures, targets, hardware and versions) and ``bench_train.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raytopk.bench.machine import machine_info  # noqa: E402
from raytopk.bench.train import materialise, plain_throughput  # noqa: E402

__all__ = ["main"]

STAGES = 2  # the cascade's stages: their graphs are alive together until backward


def _ray_steady(progress_csv: Path) -> dict[str, float]:
    with open(progress_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kind") == "step"]
    steady = rows[1:] if len(rows) > 1 else rows  # the first window holds the pipeline start
    sps = [float(r["samples_per_s"]) for r in steady]
    wait = [float(r["data_wait_frac"]) for r in steady]
    all_sps = [float(r["samples_per_s"]) for r in rows]
    # Windows hold equal numbers of rows, so the overall rate is the harmonic mean.
    return {
        "samples_per_s": len(sps) / sum(1.0 / s for s in sps),
        "data_wait_frac": sum(wait) / len(wait),
        "samples_per_s_incl_first_window": len(all_sps) / sum(1.0 / s for s in all_sps),
        "windows": len(rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench_train")
    p.add_argument("--data-root", default="data/bench_train")
    p.add_argument("--requests-per-day", type=int, default=30000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--op", default="dftopk", help="operator of the Ray-vs-plain comparison")
    p.add_argument("--sweep-steps", type=int, default=8, help="timed steps per operator")
    p.add_argument("--sweep-max-seconds", type=float, default=60.0)
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument(
        "--mem-budget-gb",
        type=float,
        default=3.0,
        help="skip sweep points whose permutation tensors would need more (recorded as skipped)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller figures for a quick check: 8000 requests, 4 sweep steps of <= 20 s",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.requests_per_day = min(args.requests_per_day, 8000)
        args.sweep_steps = min(args.sweep_steps, 4)
        args.sweep_max_seconds = min(args.sweep_max_seconds, 20.0)
        if args.data_root == "data/bench_train":
            args.data_root = "data/bench_train_quick"

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from raytopk.data import schema
    from raytopk.data.synthetic import prepare_synthetic
    from raytopk.losses.forms import step_bytes, step_fits
    from raytopk.ops import get_spec, list_ops
    from raytopk.ray_env import init_ray
    from raytopk.train.config import load_config
    from raytopk.train.driver import run
    from raytopk.train.prepare import prepare
    from raytopk.train.resources import plan_resources

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_synthetic(
        Path(args.data_root), days=2, requests_per_day=args.requests_per_day, seed=0
    )
    init_ray()
    ray_dir = out / "ray_run"
    shutil.rmtree(ray_dir, ignore_errors=True)
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"data.batch_size={args.batch_size}",
            "data.sample_num=0",
            f"op.name={args.op}",
            "scaling.num_workers=1",
            "scaling.use_gpu=false",
            "run.report_every_steps=10",
            "run.corpus_ms=[]",
            "run.eval_max_batches=1",
            f"run.output_dir={ray_dir}",
            "run.name=bench_train",
        ],
    )
    prep = prepare(cfg)
    day, vocab = prep.cfg.data.train_days[0], dict(prep.meta["vocab"])
    plan = plan_resources(
        ray.cluster_resources(), num_workers=1, use_gpu=False, concurrent=1
    )
    cpus, threads = plan.cpus_per_worker, plan.threads

    t0 = time.perf_counter()
    ray_final = run(cfg, verbose=False)
    ray_fit_s = time.perf_counter() - t0
    ray_res = _ray_steady(ray_dir / "progress.csv")
    ray_res.update(
        {
            "fit_wall_seconds": round(ray_fit_s, 1),
            "cpus_per_worker": cpus,
            "torch_threads": threads,
            "train_seconds": ray_final.get("train_seconds"),
        }
    )

    batches = materialise(
        str(data), day, sample_num=0, batch_size=args.batch_size, seed=prep.cfg.run.seed
    )
    torch.set_num_threads(threads)
    plain = plain_throughput(prep.cfg, vocab, batches)
    torch.set_num_threads(os.cpu_count() or 1)
    plain_all = plain_throughput(prep.cfg, vocab, batches)
    ratio = ray_res["samples_per_s"] / plain["samples_per_s"]
    print(
        f"Ray Train + Ray Data (1 worker, {threads} thread): {ray_res['samples_per_s']:,.0f} "
        f"samples/s, data wait {ray_res['data_wait_frac']:.1%}"
    )
    print(
        f"plain loop, same batches in memory ({threads} thread): "
        f"{plain['samples_per_s']:,.0f} samples/s -> ratio {ratio:.2f}"
    )
    print(f"plain loop, {os.cpu_count()} threads: {plain_all['samples_per_s']:,.0f} samples/s")

    sweep: dict[str, dict[str, Any]] = {}
    if not args.skip_sweep:
        torch.set_num_threads(threads)
        for n in (0, 160):
            bs = materialise(
                str(data),
                day,
                sample_num=n,
                batch_size=args.batch_size,
                seed=prep.cfg.run.seed,
                max_batches=args.sweep_steps + 2,
            )
            for op in list_ops():
                spec = get_spec(op)
                need = step_bytes(op, args.batch_size, schema.N_OWN + n, STAGES)
                if not step_fits(op, args.batch_size, schema.N_OWN + n, STAGES,
                                 args.mem_budget_gb):  # fmt: skip
                    sweep.setdefault(op, {})[f"N={schema.N_OWN + n}"] = {
                        "skipped": f"needs ~{need / 2**30:.1f} GiB > --mem-budget-gb "
                        f"{args.mem_budget_gb:g} (O(N^2) memory)"
                    }
                    gb, big_n = need / 2**30, schema.N_OWN + n
                    print(f"  {op:12s} sample_num={n:3d} (N={big_n}): skipped ({gb:.1f} GB)")
                    continue
                c = load_config(
                    None,
                    [
                        f"data.path={data}",
                        f"op.name={op}",
                        f"op.params.{spec.param}={spec.default}",
                    ],
                )
                r = plain_throughput(
                    c,
                    vocab,
                    bs,
                    warmup=2,
                    max_steps=args.sweep_steps,
                    max_seconds=args.sweep_max_seconds,
                )
                sweep.setdefault(op, {})[f"N={schema.N_OWN + n}"] = r
                print(
                    f"  {op:12s} sample_num={n:3d} (N={schema.N_OWN + n}): "
                    f"{r['samples_per_s']:9,.0f} samples/s ({r['s_per_step'] * 1e3:.1f} ms/step)"
                )

    result = {
        "batch_size": args.batch_size,
        "requests_per_day": args.requests_per_day,
        "op": args.op,
        "ray_train_1_worker": ray_res,
        "plain_same_threads": plain,
        "plain_all_threads": {**plain_all, "torch_threads": os.cpu_count()},
        "ratio_ray_over_plain": ratio,
        "targets": {
            "ratio_ge_0.8": ratio >= 0.8,
            "data_wait_lt_0.1": ray_res["data_wait_frac"] < 0.1,
        },
        "ops_samples_per_s": sweep,
        "machine": machine_info(),
    }
    (out / "bench_train.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out / "bench_train.png")
    print(f"wrote {out / 'bench_train.json'} and {out / 'bench_train.png'}")
    return 0


def _plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    labels = ["Ray Train + Data\n1 worker", "plain loop\nsame threads", "plain loop\nall threads"]
    vals = [
        result["ray_train_1_worker"]["samples_per_s"],
        result["plain_same_threads"]["samples_per_s"],
        result["plain_all_threads"]["samples_per_s"],
    ]
    axes[0].bar(labels, vals, color=["tab:blue", "tab:gray", "tab:gray"])
    axes[0].set_ylabel("samples/s")
    axes[0].set_title(
        f"{result['op']}, batch {result['batch_size']}: ratio {result['ratio_ray_over_plain']:.2f}"
    )
    sweep = result["ops_samples_per_s"]
    if sweep:
        ops = list(sweep)
        width = 0.4
        for j, n in enumerate(("N=40", "N=200")):
            axes[1].bar(
                [i + j * width for i in range(len(ops))],
                [sweep[o].get(n, {}).get("samples_per_s", 0) for o in ops],
                width,
                label=n,
            )
        axes[1].set_xticks([i + width / 2 for i in range(len(ops))], ops, rotation=20)
        axes[1].set_yscale("log")
        axes[1].set_ylabel("samples/s (plain loop)")
        axes[1].legend()
    m = result["machine"]
    fig.suptitle(f"{m['cpu_model']} ({m['cpu_cores']} CPUs), torch {m['torch']}, ray {m['ray']}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
