"""The local backend's training loop measured on one device (jobs/gpu_check.py).

Notation: B = requests per batch, N = 40 + sample_num candidates per request.

Two passes per configuration (N, precision), on the same day of a converted dataset:
- throughput: ``raytopk.train.loop.train_loop`` itself with a LocalSession (``run.backend=local``)
  for a fixed number of steps (``run.max_samples``), unsynchronised; requests/s and the
  data-wait fraction come from the loop's own step reports (every report window is ``window``
  full batches), the first ``warm_windows`` windows left out (CUDA/cuBLAS start-up, the day's
  read and sort, numba);
- profiled: the same training step (``_Worker.step``) with a device synchronisation after each
  phase: data wait (blocked in ``next()``), host-to-device copy, forward + loss, backward,
  optimiser. Separate and short, so its synchronisations do not slow the throughput pass.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from raytopk.bench.harness import sync
from raytopk.train.local import LocalSession

__all__ = ["GOAL", "goal", "measure_configs", "train_configs"]

GOAL = {"requests_per_s": 55_000, "data_wait_frac": 0.10}  # batch 1024, N = 40, one H200


def train_configs() -> list[dict[str, Any]]:
    """The paper's shape at N = 40 and 200, float32 and bf16 autocast."""
    return [
        {"N": 40 + s, "sample_num": s, "precision": p, "amp": p == "bf16"}
        for s in (0, 160)
        for p in ("fp32", "bf16")
    ]


class _Recording(LocalSession):
    """A LocalSession that also keeps every report in memory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], *rest: Any, **kwargs: Any) -> None:
        self.records.append(dict(metrics))
        super().report(metrics, *rest, **kwargs)


def _prepared(data: Path, work: Path, size: dict[str, Any], c: dict[str, Any], label: str) -> Any:
    from raytopk.train.config import load_config
    from raytopk.train.prepare import prepare

    days = json.loads((data / "meta.json").read_text())["days"]
    steps = size["window"] * (size["warm_windows"] + size["windows"])
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


def _throughput(prep: Any, device: torch.device, size: dict[str, Any], threads: int) -> dict:
    from raytopk.train.driver import dataset_specs, loop_spec
    from raytopk.train.loop import train_loop

    session = _Recording(prep, dataset_specs(prep), device, False)
    t0 = time.perf_counter()
    train_loop(loop_spec(prep, threads), session)
    wall = time.perf_counter() - t0
    steps = [m for m in session.records if m["kind"] == "step"]
    final = next(m for m in session.records if m["kind"] == "final")
    measured = steps[size["warm_windows"] :]
    rows = size["window"] * size["batch"]  # every window is `window` full batches
    secs = [rows / m["samples_per_s"] for m in measured]
    wait = sum(m["data_wait_frac"] * s for m, s in zip(measured, secs))
    return {
        "requests_per_s": round(rows * len(measured) / sum(secs), 1),
        "data_wait_frac": round(wait / sum(secs), 4),
        "step_ms": round(1e3 * sum(secs) / (len(measured) * size["window"]), 3),
        "steps_measured": len(measured) * size["window"],
        "steps_total": final["global_step"],
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
        "loss_finite": all(math.isfinite(m["loss"]) for m in steps),
        "amp_used": final["amp"],
        "wall_s": round(wall, 2),
    }


def _profile(prep: Any, device: torch.device, size: dict[str, Any], threads: int) -> dict:
    """The same training step with a device sync after each phase (mean ms over the steps)."""
    from raytopk.data.batches import CascadeBatches
    from raytopk.ops import warmup as warmup_op
    from raytopk.train.checkpoint import Position
    from raytopk.train.driver import dataset_specs, loop_spec
    from raytopk.train.loop import _Worker, train_key
    from raytopk.train.model import CascadeModel

    cfg, day = prep.cfg, prep.cfg.data.train_days[0]
    torch.manual_seed(cfg.run.seed)
    model = CascadeModel.from_config(cfg, dict(prep.meta["vocab"]), device).to(device)
    warmup_op(cfg.op.name)
    w = _Worker(cfg, loop_spec(prep, threads), 0, 1, model, Position())
    session = _Recording(prep, dataset_specs(prep), device, False)
    bs, pf = cfg.data.batch_size, cfg.data.prefetch_batches
    source = session.dataset(train_key(day), bs, pf)
    batches = CascadeBatches(source, bs, pf, pin=device.type == "cuda")
    phases = ("data_wait", "h2d", "forward", "backward", "optimizer")
    sums = dict.fromkeys(phases, 0.0)
    warm, n = size["profile_warm"], size["profile"]
    it = iter(batches)
    for i in range(warm + n):
        sync(device)
        t = {"start": time.perf_counter()}
        batch = next(it)  # blocked here: the data wait
        t["data"] = time.perf_counter()
        batch = batch.to(device, non_blocking=True)
        sync(device)
        t["h2d"] = time.perf_counter()

        def mark(phase: str, t: dict = t) -> None:
            sync(device)
            t[phase] = time.perf_counter()

        w.step(batch, f"profile step {i}", mark)
        if i >= warm:
            order = ["start", "data", "h2d", "forward", "backward", "optimizer"]
            for phase, a, b in zip(phases, order, order[1:]):
                sums[phase] += t[b] - t[a]
    return {p: round(1e3 * v / n, 3) for p, v in sums.items()}


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
        prep = _prepared(data, work, size, c, label)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rec = {**c, "batch": size["batch"], **_throughput(prep, device, size, threads)}
        rec["split_ms"] = _profile(prep, device, size, threads)
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
