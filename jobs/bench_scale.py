"""Scale benchmark: a real-density synthetic RecFlow day through generation, conversion, training
and evaluation, with time, requests/s and peak memory per phase.

    python jobs/bench_scale.py [--quick] [--phases generate,convert,train,eval]
        [--requests-per-day 250000] [--days 2] [--users 40000] [--items 500000]
        [--data data/bench_scale] [--out runs/bench_scale]
        [--train-seconds 300] [--eval-max-batches 20]

Phases (each a subprocess, so its peak RSS is its own):
- generate: ``prepare_data.py synthetic --density recflow`` (~200 stage items per request, like the
  release) into DATA/raw; reused when DATA/raw was made with the same sizes;
- convert: ``prepare_data.py convert`` one day at a time into a fresh DATA/parquet, so time,
  requests/s and peak RSS are per day;
- train: ``jobs/train.py --config jobs/configs/recflow_dftopk.yaml`` on the first day for
  --train-seconds of training, then the evaluation capped at --eval-max-batches test batches
  (the second day is the test day);
- eval: the same run resumed from its checkpoint with the evaluation uncapped (the whole day).
Peak RSS: the phase's own process (``os.wait4``, which includes children it waited for) and, on
Linux, the sampled peak of its whole process tree (Ray's workers live there). Writes
bench_scale.json and bench_scale.png to --out; --quick (a few hundred requests) is what the unit
test runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # importable from a checkout without installing

from raytopk.data.convert import read_meta  # noqa: E402
from raytopk.data.synthetic import day_names  # noqa: E402

__all__ = ["main", "run_phase"]

PHASES = ("generate", "convert", "train", "eval")
FULL = {"requests_per_day": 250_000, "days": 2, "users": 40_000, "items": 500_000}
QUICK = {"requests_per_day": 300, "days": 2, "users": 60, "items": 5_000}
TRAIN_CONFIG = ROOT / "jobs" / "configs" / "recflow_dftopk.yaml"


# ---- measuring a subprocess ------------------------------------------------------------------
def _tree_rss_bytes(root: int) -> int | None:
    """Summed RSS of ``root`` and its descendants from /proc (None where /proc is absent)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    parent, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            statm = (p / "statm").read_text().split()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        parent[int(p.name)] = int(fields[1])
        rss[int(p.name)] = int(statm[1]) * page
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for c in children.get(frontier.pop(), []):
            if c not in tree:
                tree.add(c)
                frontier.append(c)
    return sum(rss.get(p, 0) for p in tree)


def run_phase(cmd: list[str], log: Path, sample_s: float = 0.5) -> dict:
    """Run ``cmd`` (stdout+stderr to ``log``); its wall time (interpreter start included), CPU
    time, exit code and peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_tree = [0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # others' work on the host
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(sample_s):
                v = _tree_rss_bytes(proc.pid)
                if v is None:
                    return
                peak_tree[0] = max(peak_tree[0], v)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    # ru_maxrss is KiB on Linux, bytes on macOS.
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "cmd": " ".join(cmd),
        "returncode": proc.returncode,
        "seconds": round(seconds, 2),
        # CPU time of the phase (and children it waited for): on a shared machine the figure
        # that does not depend on what else runs.
        "cpu_user_s": round(usage.ru_utime, 2),
        "cpu_sys_s": round(usage.ru_stime, 2),
        "load_avg_before": load,
        "peak_rss_gb": round(maxrss / 2**30, 3),
        "peak_tree_rss_gb": round(peak_tree[0] / 2**30, 3) if peak_tree[0] else None,
        "log": str(log),
    }


def _check(res: dict, phase: str) -> None:
    if res["returncode"] != 0:
        tail = Path(res["log"]).read_text()[-3000:]
        raise RuntimeError(f"phase {phase} failed (exit {res['returncode']}):\n{tail}")


# ---- phases ----------------------------------------------------------------------------------
def _generate(size: dict, data: Path, out: Path, seed: int) -> dict:
    raw = data / "raw"
    params = {**size, "seed": seed, "density": "recflow"}
    stamp = raw / "bench_params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return {"reused": True, "raw": str(raw), **params}
    tmp = data / f".raw-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "synthetic", "--out", str(tmp),
        "--days", str(size["days"]), "--requests-per-day", str(size["requests_per_day"]),
        "--users", str(size["users"]), "--items", str(size["items"]), "--seed", str(seed),
        "--density", "recflow",
    ]  # fmt: skip
    res = run_phase(cmd, out / "logs" / "generate.log")
    _check(res, "generate")
    (tmp / "bench_params.json").write_text(json.dumps(params))
    shutil.rmtree(raw, ignore_errors=True)
    os.rename(tmp, raw)
    n = size["days"] * size["requests_per_day"]
    return {"reused": False, "raw": str(raw), **params, **res,
            "requests_per_s": round(n / res["seconds"], 1)}  # fmt: skip


def _convert(data: Path, out: Path, days: list[str]) -> dict:
    pq_dir = data / "parquet"
    shutil.rmtree(pq_dir, ignore_errors=True)  # measure a conversion, not a skip
    per_day = []
    for day in days:
        cmd = [sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "convert",
               "--src", str(data / "raw"), "--out", str(pq_dir), "--days", day]  # fmt: skip
        res = run_phase(cmd, out / "logs" / f"convert-{day}.log")
        _check(res, f"convert {day}")
        meta = read_meta(pq_dir, "--out")
        n = meta["counts"]["requests_per_day"][day]
        per_day.append({"day": day, "requests": n,
                        "requests_per_s": round(n / res["seconds"], 1), **res})  # fmt: skip
    return {"parquet": str(pq_dir), "per_day": per_day}


def _train(
    data: Path, out: Path, days: list[str], seconds: float, eval_batches: int, eval_threads: int
) -> dict:
    run_dir = out / "run"
    overrides = [
        f"run.eval_threads={eval_threads}",
        f"data.path={data / 'parquet'}",
        f"data.train_days=['{days[0]}']",
        f"data.test_day='{days[1]}'",
        f"run.max_train_seconds={seconds}",
        f"run.eval_max_batches={eval_batches}",
        "run.report_every_steps=5",  # enough report windows for a steady-state figure
        "scaling.num_workers=1",
        "scaling.use_gpu=auto",
        f"run.output_dir={run_dir}",
        "run.name=bench_scale",
    ]
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(TRAIN_CONFIG),
           *overrides]  # fmt: skip
    return _run_train(cmd, out, run_dir, "train")


def _eval_full(data: Path, out: Path, days: list[str], eval_threads: int) -> dict:
    """The train phase's run, resumed from its checkpoint, evaluated on the whole test day."""
    run_dir = out / "run"
    overrides = [
        f"run.eval_threads={eval_threads}",
        f"data.path={data / 'parquet'}",
        f"data.train_days=['{days[0]}']",
        f"data.test_day='{days[1]}'",
        "run.eval_max_batches=0",
        "scaling.num_workers=1",
        "scaling.use_gpu=auto",
        f"run.output_dir={run_dir}",
        "run.name=bench_scale",
        "run.resume=true",
    ]
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(TRAIN_CONFIG),
           *overrides]  # fmt: skip
    return _run_train(cmd, out, run_dir, "eval")


def _steady_training(progress: Path) -> dict:
    """Training throughput from progress.csv's step rows: the first report window of the day
    holds the wait for the day's first batch (the dataset's start: read, the within-day sort),
    the later ones are steady state (median samples/s and data-wait fraction)."""
    import csv
    import statistics

    if not progress.is_file():
        return {}
    with progress.open(newline="") as f:
        steps = [r for r in csv.DictReader(f) if r.get("kind") == "step"]
    if not steps:
        return {}
    seen = [0] + [int(r["samples_seen"]) for r in steps]
    # A window's seconds: the samples it trained over its samples/s.
    rates = [max(float(r["samples_per_s"]), 1e-9) for r in steps]
    secs = [(b - a) / rate for a, b, rate in zip(seen, seen[1:], rates)]
    first_wait = float(steps[0]["data_wait_frac"]) * secs[0]
    steady = steps[1:] or steps
    return {
        "steady_samples_per_s": round(statistics.median(float(r["samples_per_s"]) for r in steady)),
        "steady_data_wait_frac": round(
            statistics.median(float(r["data_wait_frac"]) for r in steady), 4
        ),
        "first_batch_wait_s": round(first_wait, 2),  # the day's start, its sort included
        "first_batch_wait_share": round(first_wait / max(sum(secs), 1e-9), 4),
        "report_windows": len(steps),
    }


def _run_train(cmd: list[str], out: Path, run_dir: Path, phase: str) -> dict:
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        metrics.unlink()  # so the figures read below are this phase's
    res = run_phase(cmd, out / "logs" / f"{phase}.log")
    _check(res, phase)
    m = json.loads(metrics.read_text()) if metrics.is_file() else {}
    keep = ("samples_seen", "train_seconds", "wall_seconds", "eval_seconds", "eval_requests")
    res.update({k: m[k] for k in keep if k in m})
    res["metrics"] = {k: v for k, v in m.items() if "recall" in k or "ndcg" in k}
    res.update(_steady_training(run_dir / "progress.csv"))
    res["note"] = "peak_rss_gb: the driver process; peak_tree_rss_gb adds Ray's processes"
    return res


# ---- main ------------------------------------------------------------------------------------
def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names, secs, rss = [], [], []
    for phase, r in result["phases"].items():
        rows = r.get("per_day", [r])
        for row in rows:
            if "seconds" not in row:
                continue
            names.append(f"{phase} {row['day']}" if "day" in row else phase)
            secs.append(row["seconds"])
            rss.append(max(row["peak_rss_gb"], row.get("peak_tree_rss_gb") or 0))
    if not names:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].barh(names, secs)
    axes[0].set_xlabel("seconds")
    axes[1].barh(names, rss, color="tab:orange")
    axes[1].set_xlabel("peak RSS (GB)")
    n = result["size"]["requests_per_day"]
    fig.suptitle(
        f"bench_scale: {n:,} real-density requests/day, {result['machine']['cpu_cores']} CPUs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny sizes for tests: {QUICK['days']} days x {QUICK['requests_per_day']}",
    )
    p.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    for k, v in FULL.items():
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"default {v}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data/bench_scale", help="raw + parquet (reused raw)")
    p.add_argument("--out", default="runs/bench_scale")
    p.add_argument("--train-seconds", type=float, default=300.0)
    p.add_argument("--eval-max-batches", type=int, default=20)
    p.add_argument(
        "--eval-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="run.eval_threads of the test-day evaluations (default: every core, the training "
        "pipeline being over; 0: the training worker's threads)",
    )
    args = p.parse_args(argv)  # fmt: skip
    if args.eval_threads < 0:
        p.error(f"--eval-threads should be >= 0 but got {args.eval_threads}")
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    bad = [x for x in phases if x not in PHASES]
    if bad:
        p.error(f"--phases: unknown {bad}; choose from {list(PHASES)}")
    size = dict(QUICK if args.quick else FULL)
    for k in FULL:
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    if ("train" in phases or "eval" in phases) and size["days"] < 2:
        p.error("train/eval need --days >= 2 (train on the first day, test on the second)")
    data = (ROOT / args.data) if not Path(args.data).is_absolute() else Path(args.data)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    data.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    days = day_names(size["days"])

    from raytopk.bench.machine import machine_info

    result: dict = {
        "size": size,
        "density": "recflow",
        "machine": machine_info("cpu"),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "phases": {},
    }
    for phase in PHASES:
        if phase not in phases:
            continue
        print(f"[bench_scale] {phase} ...", flush=True)
        if phase == "generate":
            r = _generate(size, data, out, args.seed)
        elif phase == "convert":
            r = _convert(data, out, days)
        elif phase == "train":
            r = _train(
                data, out, days, args.train_seconds, args.eval_max_batches, args.eval_threads
            )
        else:
            r = _eval_full(data, out, days, args.eval_threads)
        result["phases"][phase] = r
        for row in r.get("per_day", [r]):
            if "seconds" in row:
                rate = (
                    f", {row['requests_per_s']:,.0f} requests/s" if "requests_per_s" in row else ""
                )
                print(
                    f"[bench_scale] {phase} {row.get('day', '')}: {row['seconds']:.1f} s{rate}, "
                    f"peak RSS {row['peak_rss_gb']:.2f} GB (tree {row['peak_tree_rss_gb']} GB)",
                    flush=True,
                )
            elif row.get("reused"):
                print(f"[bench_scale] {phase}: reused {row['raw']}", flush=True)
    (out / "bench_scale.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "bench_scale.png")
    print(f"[bench_scale] wrote {out / 'bench_scale.json'}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
