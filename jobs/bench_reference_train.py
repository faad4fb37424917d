"""Training throughput (requests/s) of raytopk against the authors' reference training code, on
the same data and protocol, interleaved (docs/reference/README.md, "Training speed against the
reference").

    python jobs/bench_reference_train.py --reference-dir /tmp/dftopk_ref/torch \\
        --data-root /tmp/refspeed/data --work /tmp/refspeed/work \\
        --out docs/reference/train_speed.json [--rounds 3] [--threads 1]

Protocol, both sides: one synthetic training day (``--requests-per-day``, a multiple of the batch
size, so that both sides train every request of the day: the reference's DataLoader drops a last
partial batch), batch 1024 requests, N = 40 candidates (no sampled negatives), embedding dim 8,
DFTopK τ = 1 with k = 10 for both stages, the joint loss with uncertainty weights, Adam lr 1e-2,
CPU, ``--threads`` torch threads each (OMP/MKL/numba thread counts and torch.set_num_threads).
Every run is a fresh process; the rounds alternate the order (reference first in odd rounds,
raytopk first in even rounds) so that a drifting background load hits both sides alike.

- Reference: its own training script (``deep_components/run_train2_negativesampling_nday.py``,
  ``--loss_type=cascade-topk_dftopkjoint``, the arguments its ``two_stage/run_x2_*_nday.sh``
  passes) from a throw-away copy of ``--reference-dir`` under ``--work`` with the changes of
  docs/reference/README.md: its list of training days (``file_1st.txt``) names the day, and its
  hard-coded seed reads ``REF_SEED``. Nothing of it is in this repository. It runs as
  ``__main__`` in a child process of this script whose only addition is a wrapper around
  ``DataLoader.__iter__`` that records when each batch is asked for and handed out (the
  batches, the model, the loss and the loop are untouched).
- raytopk: ``raytopk.train.driver.run`` on jobs/configs/reference_compare.yaml, local backend
  (no Ray), ``run.test_eval=false``, one step per report, in a child process.

What is timed, the same rule on both sides (raytopk's step clock, raytopk.train.measure): a step
runs from the end of the previous one (for the first step: from its batch's arrival) to the end
of its optimiser update, so the data wait of every batch but the first counts and process start,
data loading before the first batch, the checkpoint after the day and evaluation do not. The
figure is requests/s over the steps after the first ``--warm-steps`` (the first step also pays
the allocator's and kernels' start-up); the rate over all steps is recorded too. Per side: the
median over rounds; the ratio is raytopk's median over the reference's. Also per step: the
training thread's CPU seconds (``time.thread_time``; raytopk's measured around its step
through a loop hook), a figure less sensitive to a busy machine.

Writes one JSON (machine, load averages, commands, per-round numbers, medians, ratio) atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["main", "check_reference_dir"]

REF_SCRIPT = "deep_components/run_train2_negativesampling_nday.py"
REF_FILES = (
    REF_SCRIPT,
    "deep_components/models.py",
    "deep_components/dataset2.py",
    "deep_components/utils.py",
    "deep_components/loss/two_stage/topk_loss.py",
    "deep_components/file_1st.txt",
)
SEED_LINE = "        seed = 42\n"
SEED_ENV = '        seed = int(os.environ.get("REF_SEED", "42"))\n'
CONFIG = "jobs/configs/reference_compare.yaml"
GOAL_RATIO = 3.0


def check_reference_dir(path: str | None) -> Path:
    """The reference's torch/ folder, or ValueError naming --reference-dir and what is missing."""
    if not path:
        raise ValueError("--reference-dir is required: the reference's torch/ folder")
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"--reference-dir {path!r} is not a directory")
    missing = [f for f in REF_FILES if not (d / f).is_file()]
    if missing:
        raise ValueError(
            f"--reference-dir {path!r} is not the reference's torch/ folder: missing "
            + ", ".join(missing)
        )
    if SEED_LINE not in (d / REF_SCRIPT).read_text():
        raise ValueError(
            f"--reference-dir {path!r}: {REF_SCRIPT} has no line {SEED_LINE.strip()!r} (another "
            "version of the reference than docs/reference/README.md describes)"
        )
    return d


def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(threads)
    return env


def _throwaway_copy(ref_dir: Path, work: Path, day: str) -> Path:
    """The reference copied under ``work`` with the documented changes: the training-day list
    names ``day``; the seed reads REF_SEED."""
    dst = work / "ref"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ref_dir, dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "deep_components/file_1st.txt").write_text(day + "\n")
    script = dst / REF_SCRIPT
    text = script.read_text()
    assert text.count(SEED_LINE) == 1, "checked by check_reference_dir"
    script.write_text(text.replace(SEED_LINE, SEED_ENV))
    return dst


def _step_rates(
    seconds: list[float], waits: list[float], cpu: list[float], batch: int, warm: int
) -> dict:
    """Requests/s over the steps after ``warm`` and over all of them (every step ``batch``
    requests); ``cpu``: the training thread's CPU seconds per step."""
    steady, steady_wait = seconds[warm:], waits[warm:]
    return {
        "steps": len(seconds),
        "requests": batch * len(seconds),
        "steps_measured": len(steady),
        "train_seconds": round(sum(seconds), 4),
        "measured_seconds": round(sum(steady), 4),
        "requests_per_s": round(batch * len(steady) / sum(steady), 2),
        "requests_per_s_all_steps": round(batch * len(seconds) / sum(seconds), 2),
        "step_ms_median": round(1e3 * statistics.median(steady), 2),
        "data_wait_frac": round(sum(steady_wait) / sum(steady), 4),
        "cpu_seconds": round(sum(cpu[warm:]), 4),
        "requests_per_cpu_s": round(batch * len(steady) / sum(cpu[warm:]), 2),
    }


# ---- child processes: one training each -------------------------------------------------------


def _reference_child(spec: dict[str, Any]) -> None:
    """Run the reference's training script as ``__main__`` (cwd: its copy), recording the time
    each batch is asked for and handed out by its DataLoader."""
    import runpy

    import torch
    import torch.utils.data as tud

    ref = Path(spec["ref"])
    # As `python deep_components/<script>` with PYTHONPATH=<copy>: the script's folder first.
    sys.path[:] = [str(ref / "deep_components"), str(ref)] + [
        p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "jobs")
    ]
    torch.set_num_threads(spec["threads"])
    loaders: list[list[tuple[float, float, float, float]]] = []
    ends: list[float] = []
    original = tud.DataLoader.__iter__

    class _Timed:
        def __init__(self, it: Any, log: list[tuple[float, float, float, float]]) -> None:
            self.it, self.log = it, log

        def __iter__(self) -> _Timed:
            return self

        def __next__(self) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                item = next(self.it)
            except StopIteration:
                ends.extend((t, c))  # the end of the last step
                raise
            self.log.append((t, time.perf_counter(), c, time.thread_time()))
            return item

        def __len__(self) -> int:
            return len(self.it)

    def timed_iter(self: Any) -> _Timed:
        loaders.append([])
        return _Timed(original(self), loaders[-1])

    tud.DataLoader.__iter__ = timed_iter
    sys.argv = [REF_SCRIPT, *spec["argv"]]
    runpy.run_path(str(ref / REF_SCRIPT), run_name="__main__")
    Path(spec["timings"]).write_text(json.dumps({"batches": loaders, "ends": ends}))


def _raytopk_child(spec: dict[str, Any]) -> None:
    import torch

    from raytopk.train.config import load_config
    from raytopk.train.driver import run
    from raytopk.train.hooks import Hook

    torch.set_num_threads(spec["threads"])
    records: list[dict[str, Any]] = []

    class StepCPU(Hook):
        """The training thread's CPU seconds of each step (from its batch on the device to the
        end of Adam), through the loop's hook interface."""

        def __init__(self) -> None:
            self.cpu: list[float] = []
            self.t = 0.0

        def phase(self, name: str) -> None:
            if name == "h2d":
                self.t = time.thread_time()

        def after_step(self, t: Any, batch: Any, step: Any) -> None:
            self.cpu.append(time.thread_time() - self.t)

    timer = StepCPU()
    final = run(
        load_config(str(ROOT / CONFIG), spec["overrides"]),
        verbose=False,
        on_report=lambda r: records.append(r.metrics()),
        hooks=[timer],
    )
    steps = [r for r in records if r.get("kind") == "step"]
    out = {"steps": steps, "cpu": timer.cpu, "final": final}
    Path(spec["timings"]).write_text(json.dumps(out, default=str))


# ---- the parent -------------------------------------------------------------------------------


def _reference_args(args: argparse.Namespace, root: str) -> list[str]:
    """The arguments two_stage/run_x2_negativesampling_nday.sh passes (its print_freq 100)."""
    return [
        "--epochs=0", "--loss_type=cascade-topk_dftopkjoint", f"--tau={args.tau}",
        f"--batch_size={args.batch_size}", f"--infer_realshow_batch_size={args.batch_size}",
        f"--infer_recall_batch_size={args.batch_size}", "--emb_dim=8", "--lr=1e-2",
        "--seq_len=50", "--cuda=0", f"--root_path={root}", "--print_freq=100",
        "--sort_type=neural_sort", "--sample_num=0", "--tag=cascade-topk_dftopkjoint-1st",
    ]  # fmt: skip


def _run_reference(args: argparse.Namespace, copy: Path, tag: str) -> dict[str, Any]:
    work = Path(args.work)
    root = work / "ref_root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "checkpoints").mkdir(parents=True)
    (root / "data").symlink_to(Path(args.data_root).resolve() / "raw")
    timings = work / f"{tag}.json"
    argv = _reference_args(args, str(root))
    spec = {"ref": str(copy), "argv": argv, "threads": args.threads, "timings": str(timings)}
    env = {**_thread_env(args.threads), "TZ": "Asia/Shanghai", "REF_SEED": str(args.seed)}
    env["PYTHONPATH"] = str(copy)
    log = work / f"{tag}.log"
    wall = _child(["_reference_child", json.dumps(spec)], copy, env, log)
    t = json.loads(timings.read_text())
    if len(t["batches"]) != 1 or len(t["ends"]) != 2:
        raise RuntimeError(f"{tag}: expected one training DataLoader pass, got {t} (see {log})")
    (batches,), (end, end_cpu) = t["batches"], t["ends"]
    asked = [b[0] for b in batches] + [end]
    seconds = [asked[1] - batches[0][1]] + [b - a for a, b in zip(asked[1:], asked[2:])]
    waits = [0.0] + [b[1] - b[0] for b in batches[1:]]
    # CPU: from the batch in hand to the next one asked for (its conversion, forward, loss,
    # backward, the optimisers, its prints).
    cpu = [c_next - b[3] for b, c_next in zip(batches, [b[2] for b in batches[1:]] + [end_cpu])]
    res = _step_rates(seconds, waits, cpu, args.batch_size, args.warm_steps)
    return {**res, "wall_s": wall}


def _run_raytopk(args: argparse.Namespace, day: str, test_day: str, tag: str) -> dict[str, Any]:
    work = Path(args.work)
    out = work / tag
    shutil.rmtree(out, ignore_errors=True)
    timings = work / f"{tag}.json"
    overrides = [
        "data.synthetic.enabled=false",
        f"data.path={Path(args.data_root).resolve() / 'parquet'}",
        f"data.train_days=[{day}]",
        f"data.test_day={test_day}",
        f"data.batch_size={args.batch_size}",
        "data.sample_num=0",
        "model.dim=8",
        "op.name=dftopk",
        f"op.params.tau={args.tau}",
        "loss.ks=[10,10]",
        f"scaling.cpus_per_worker={args.threads}",
        "run.backend=local",
        "run.test_eval=false",
        "run.report_every_steps=1",
        f"run.seed={args.seed}",
        "run.resume=false",
        f"run.output_dir={out}",
        f"run.name={tag}",
    ]
    spec = {"overrides": overrides, "threads": args.threads, "timings": str(timings)}
    env = _thread_env(args.threads)
    env["PYTHONPATH"] = str(ROOT)
    wall = _child(["_raytopk_child", json.dumps(spec)], ROOT, env, work / f"{tag}.log")
    t = json.loads(timings.read_text())
    rows = [int(s["samples_seen"]) for s in t["steps"]]
    if rows != [args.batch_size * (i + 1) for i in range(len(rows))]:
        raise RuntimeError(f"{tag}: steps of other than {args.batch_size} requests: {rows}")
    seconds = [args.batch_size / s["samples_per_s"] for s in t["steps"]]
    waits = [s["data_wait_frac"] * x for s, x in zip(t["steps"], seconds)]
    if len(t["cpu"]) != len(seconds):
        raise RuntimeError(f"{tag}: {len(t['cpu'])} timed steps, {len(seconds)} reported")
    res = _step_rates(seconds, waits, t["cpu"], args.batch_size, args.warm_steps)
    res["loop_train_seconds"] = t["final"]["train_seconds"]  # the loop's own clock, all steps
    res["loss_first"], res["loss_last"] = t["steps"][0]["loss"], t["steps"][-1]["loss"]
    return {**res, "wall_s": wall}


def _child(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, "-B", str(Path(__file__).resolve()), *cmd],
            cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}), log {log}:\n{tail}")
    return round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_reference_child"]:
        _reference_child(json.loads(argv[1]))
        return 0
    if argv[:1] == ["_raytopk_child"]:
        sys.path.insert(0, str(ROOT))
        _raytopk_child(json.loads(argv[1]))
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reference-dir", help="the reference's torch/ folder (required)")
    p.add_argument("--data-root", default="data/bench_reference_train")
    p.add_argument("--work", default="runs/bench_reference_train", help="throw-away copy, runs")
    p.add_argument("--out", default="runs/bench_reference_train/train_speed.json")
    p.add_argument("--requests-per-day", type=int, default=20480)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, choices=(1, 2))
    p.add_argument("--warm-steps", type=int, default=1, help="first steps left out of the rate")
    args = p.parse_args(argv)
    try:
        ref_dir = check_reference_dir(args.reference_dir)
    except ValueError as e:
        p.error(str(e))
    if args.requests_per_day % args.batch_size:
        p.error(
            f"--requests-per-day {args.requests_per_day} is not a multiple of --batch-size "
            f"{args.batch_size} (the reference drops a last partial batch)"
        )
    if args.requests_per_day // args.batch_size <= args.warm_steps:
        p.error("--warm-steps leaves no step to measure")

    sys.path.insert(0, str(ROOT))
    import torch

    from raytopk.bench.machine import machine_info
    from raytopk.data.synthetic import prepare_synthetic

    torch.set_num_threads(args.threads)
    data = prepare_synthetic(
        Path(args.data_root), days=2, requests_per_day=args.requests_per_day, seed=0
    )
    day, test_day = json.loads((data / "meta.json").read_text())["days"][:2]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    copy = _throwaway_copy(ref_dir, work, day)

    rounds: list[dict[str, Any]] = []
    for r in range(1, args.rounds + 1):
        order = ("reference", "raytopk") if r % 2 else ("raytopk", "reference")
        row: dict[str, Any] = {"round": r, "order": list(order)}
        for side in order:
            load = os.getloadavg()[0]
            if side == "reference":
                res = _run_reference(args, copy, f"ref_r{r}")
            else:
                res = _run_raytopk(args, day, test_day, f"rt_r{r}")
            res["loadavg_1min_before"] = round(load, 2)
            row[side] = res
            print(
                f"round {r} {side:9s}: {res['requests_per_s']:8,.0f} requests/s "
                f"({res['steps_measured']} steps, median step {res['step_ms_median']:.0f} ms, "
                f"data wait {res['data_wait_frac']:.1%}; per CPU second "
                f"{res['requests_per_cpu_s']:,.0f}; all steps "
                f"{res['requests_per_s_all_steps']:,.0f}; process {res['wall_s']:.0f} s; "
                f"load {load:.2f})",
                flush=True,
            )
        rt, ref = row["raytopk"], row["reference"]
        row["ratio"] = round(rt["requests_per_s"] / ref["requests_per_s"], 3)
        row["ratio_cpu"] = round(rt["requests_per_cpu_s"] / ref["requests_per_cpu_s"], 3)
        rounds.append(row)

    def med(side: str, key: str = "requests_per_s") -> float:
        return round(statistics.median(r[side][key] for r in rounds), 2)

    ratio = round(med("raytopk") / med("reference"), 3)
    ratio_cpu = round(
        med("raytopk", "requests_per_cpu_s") / med("reference", "requests_per_cpu_s"), 3
    )
    ratio_all = round(
        med("raytopk", "requests_per_s_all_steps") / med("reference", "requests_per_s_all_steps"),
        3,
    )
    print(
        f"median requests/s: raytopk {med('raytopk'):,.0f}, reference {med('reference'):,.0f} "
        f"-> ratio {ratio:.2f} (goal >= {GOAL_RATIO:g}; all steps: {ratio_all:.2f}; per round "
        + ", ".join(f"{r['ratio']:.2f}" for r in rounds)
        + f"); per CPU second: raytopk {med('raytopk', 'requests_per_cpu_s'):,.0f}, reference "
        f"{med('reference', 'requests_per_cpu_s'):,.0f} -> ratio {ratio_cpu:.2f}"
    )
    result = {
        "protocol": {
            "data": f"prepare_synthetic({str(args.data_root)!r}, days=2, requests_per_day="
            f"{args.requests_per_day}, seed=0): training day {day} (raw layout for the "
            "reference, parquet for raytopk)",
            "batch_size": args.batch_size,
            "candidates": 40,
            "emb_dim": 8,
            "loss": f"DFTopK joint loss, tau {args.tau:g}, k = 10 both stages, Adam lr 1e-2",
            "seed": args.seed,
            "threads_per_side": args.threads,
            "warm_steps_left_out": args.warm_steps,
            "timing": "step = end of the previous step (first step: its batch's arrival) to the "
            "end of its optimiser update; later batches' data wait included; process start, "
            "loading before the first batch, the day's checkpoint and evaluation excluded",
            "cpu_timing": "the training thread's CPU time (time.thread_time) per step: reference "
            "from its batch handed out to the next one asked for, raytopk around the loop's "
            "training step (a loop hook: from the batch on the device to the end of Adam); data "
            "preparation runs elsewhere on both sides (the "
            "reference's DataLoader worker process, raytopk's prefetch thread) and is not in it",
        },
        "command": " ".join(["python", "jobs/bench_reference_train.py", *argv]),
        "reference_changes": [
            f"deep_components/file_1st.txt lists {day} only",
            f"{REF_SCRIPT}: {SEED_LINE.strip()!r} -> {SEED_ENV.strip()!r}",
            "run as __main__ by a child of this script that wraps DataLoader.__iter__ to record "
            "when each batch is asked for and handed out (no change to the code)",
        ],
        "reference_argv": ["python", "-B", "-u", REF_SCRIPT]
        + _reference_args(args, "<work>/ref_root"),
        "rounds": rounds,
        "median_requests_per_s": {"reference": med("reference"), "raytopk": med("raytopk")},
        "median_requests_per_s_all_steps": {
            "reference": med("reference", "requests_per_s_all_steps"),
            "raytopk": med("raytopk", "requests_per_s_all_steps"),
        },
        "ratio_raytopk_over_reference": ratio,
        "ratio_all_steps": ratio_all,
        "median_requests_per_cpu_s": {
            "reference": med("reference", "requests_per_cpu_s"),
            "raytopk": med("raytopk", "requests_per_cpu_s"),
        },
        "ratio_cpu": ratio_cpu,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
        "machine": machine_info(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)  # never a half-written result
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
