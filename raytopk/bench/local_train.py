"""The local backend's training loop measured on one device (jobs/gpu_check.py).

Notation: B = requests per batch, N = 40 + sample_num candidates per request.

Two passes per configuration (N, precision), on the same day of a converted dataset:
- throughput: ``raytopk.train.loop.train_loop`` itself with a LocalSession (``run.backend=local``)
  for a fixed number of steps (``run.max_samples``), unsynchronised; requests/s and the
  data-wait fraction come from the loop's own step reports (every report window is ``window``
  full batches), the first ``warm_windows`` windows left out (CUDA/cuBLAS start-up, the day's
  read and sort, numba);
- profiled: the same loop with a step-time split hook (``raytopk.train.measure.PhaseTimer``: a
  device synchronisation after each phase: data wait (blocked in ``next()``), host-to-device
  copy, forward + loss, backward, optimiser). Separate and short, so its synchronisations do
  not slow the throughput pass.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from raytopk.bench.harness import sync
from raytopk.train.events import FinalReport, Report, StepReport
from raytopk.train.local_session import LocalSession
from raytopk.train.measure import PhaseTimer

__all__ = ["GOAL", "goal", "measure_configs", "train_configs"]

GOAL = {"requests_per_s": 55_000, "data_wait_frac": 0.10}  # batch 1024, N = 40, one H200


def train_configs() -> list[dict[str, Any]]:
    """The paper's shape at N = 40 and 200, float32 and bf16 autocast."""
    return [
        {"N": 40 + s, "sample_num": s, "precision": p, "amp": p == "bf16"}
        for s in (0, 160)
        for p in ("fp32", "bf16")
    ]


def _prepared(
    data: Path, work: Path, size: dict[str, Any], c: dict[str, Any], label: str, steps: int
) -> Any:
    from raytopk.data.convert import read_meta
    from raytopk.train.config import load_config
    from raytopk.train.prepare import prepare

    days = read_meta(data, "data")["days"]
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"data.train_days=[{days[0]}]",
            f"data.test_day={days[1]}",
            f"data.batch_size={size['batch']}",
            f"data.eval_batch_size={size['batch']}",
            f"data.sample_num={c['sample_num']}",
            f"optim.amp={str(c['amp']).lower()}",
            "run.backend=local",
            f"run.report_every_steps={size['window']}",
            "run.corpus_ms=[]",
            f"run.max_samples={steps * size['batch']}",
            "run.eval_max_batches=1",
            f"run.output_dir={work / label}",
            f"run.name={label}",
            "run.resume=false",
        ],
    )
    prep = prepare(cfg)
    prep.output_dir.mkdir(parents=True, exist_ok=True)  # as raytopk.train.driver.run does
    return prep


def _throughput(data: Path, work: Path, c: dict[str, Any], label: str, device: torch.device,
                size: dict[str, Any], threads: int) -> dict:  # fmt: skip
    from raytopk.train.driver import dataset_specs, loop_spec
    from raytopk.train.loop import train_loop

    steps = size["window"] * (size["warm_windows"] + size["windows"])
    prep = _prepared(data, work, size, c, label, steps)
    reports: list[Report] = []
    session = LocalSession(prep, dataset_specs(prep), device, False, reports.append)
    t0 = time.perf_counter()
    train_loop(loop_spec(prep, threads), session)
    wall = time.perf_counter() - t0
    windows = [r for r in reports if isinstance(r, StepReport)]
    final = next(r for r in reports if isinstance(r, FinalReport))
    measured = windows[size["warm_windows"] :]
    rows = size["window"] * size["batch"]  # every window is `window` full batches
    secs = [rows / r.samples_per_s for r in measured]
    wait = sum(r.data_wait_frac * s for r, s in zip(measured, secs))
    return {
        "requests_per_s": round(rows * len(measured) / sum(secs), 1),
        "data_wait_frac": round(wait / sum(secs), 4),
        "step_ms": round(1e3 * sum(secs) / (len(measured) * size["window"]), 3),
        "steps_measured": len(measured) * size["window"],
        "steps_total": final.where.global_step,
        "loss_first": windows[0].losses["loss"],
        "loss_last": windows[-1].losses["loss"],
        "loss_finite": all(math.isfinite(r.losses["loss"]) for r in windows),
        "amp_used": final.run["amp"],
        "wall_s": round(wall, 2),
    }


def _profile(data: Path, work: Path, c: dict[str, Any], label: str, device: torch.device,
             size: dict[str, Any], threads: int) -> dict:  # fmt: skip
    """The same loop with a device sync after each phase (mean ms over the profiled steps)."""
    from raytopk.train.driver import dataset_specs, loop_spec
    from raytopk.train.loop import train_loop

    warm, n = size["profile_warm"], size["profile"]
    prep = _prepared(data, work, size, c, f"{label}_profile", warm + n)
    session = LocalSession(prep, dataset_specs(prep), device, False)
    timer = PhaseTimer(lambda: sync(device), skip=warm)
    train_loop(loop_spec(prep, threads), session, hooks=[timer])
    return timer.mean_ms()


def measure_configs(
    data: Path, work: Path, device: torch.device, size: dict[str, Any], threads: int, log: Any
) -> list[dict[str, Any]]:
    """Both passes for every ``train_configs()`` entry on the dataset ``data`` (its first day
    trains, its second is the test day); runs under ``work``. ``size``: batch, window (steps per
    report), warm_windows and windows (left out / measured), profile_warm and profile (steps of
    the profiled pass). One record per configuration."""
    out = []
    for c in train_configs():
        label = f"n{c['N']}_{c['precision']}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rec = {**c, "batch": size["batch"], **_throughput(data, work, c, label, device, size,
                                                            threads)}  # fmt: skip
        rec["split_ms"] = _profile(data, work, c, label, device, size, threads)
        rec["peak_gpu_bytes"] = (
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        )
        out.append(rec)
        log(
            f"train {label}: {rec['requests_per_s']:,.0f} requests/s, data wait "
            f"{100 * rec['data_wait_frac']:.1f}%, step {rec['step_ms']:.2f} ms, split "
            f"{rec['split_ms']}, loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}"
        )
    return out


def goal(train: list[dict[str, Any]]) -> dict[str, Any]:
    """The GPU throughput goal (docs/protocol.md §5.3) at batch 1024, N = 40 (either precision)."""
    got = {r["precision"]: r for r in train if r["N"] == 40 and r["batch"] == 1024}
    return {
        **GOAL,
        "met": {
            p: r["requests_per_s"] >= GOAL["requests_per_s"]
            and r["data_wait_frac"] < GOAL["data_wait_frac"]
            for p, r in got.items()
        },
    }
