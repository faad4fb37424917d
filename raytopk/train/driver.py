"""The training driver: launch a validated run as a Ray Train TorchTrainer (or, with
``run.backend: local``, in this process), collect its result.

``run(cfg)`` is what ``jobs/train.py`` (and the Tune study) call. In order:

1. ``raytopk.train.prepare.prepare`` - no Ray needed: data, days, operator parameters and an
   existing checkpoint are checked before any worker starts;
2. ``raytopk.train.resources.plan_resources`` - GPUs when the cluster has them
   (``scaling.use_gpu: auto``), else CPU workers sized so that Ray Data keeps CPUs of its own;
3. :func:`build_datasets` - one Ray dataset per training day (read in date order by the loop),
   one per streaming-eval day and one for the test day (in-batch negative sampling runs in Ray
   Data);
4. ``TorchTrainer`` (Ray Train V2) with ``RunConfig(storage_path=run.output_dir,
   name="checkpoints", CheckpointConfig, FailureConfig(max_failures))``; Ray restores its latest
   checkpoint when the same output_dir is run again, and after a worker failure;
5. outputs in ``run.output_dir`` (raytopk.train.outputs): ``config.yaml`` (resolved),
   ``progress.csv`` (written live from the controller, which also prints progress),
   ``checkpoints/``, ``metrics.json`` and ``curves.png``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raytopk import ray_env
from raytopk.train.config import TrainConfig, dump_yaml, from_dict, to_dict
from raytopk.train.outputs import LAST_REPORT, ProgressLog, plot_curves, read_last_report
from raytopk.train.prepare import (
    CHECKPOINTS,
    Prepared,
    latest_checkpoint,
    planned_samples,
    prepare,
)
from raytopk.train.resources import plan_resources
from raytopk.train.session import LoopSpec

__all__ = [
    "DatasetSpec",
    "TrainingStopped",
    "build_datasets",
    "dataset_specs",
    "day_seed",
    "load_run_config",
    "loop_spec",
    "run",
]


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss; the message names the step and the loss parts."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a run, as both backends build it (Ray Data, or raytopk.data.local_reader)."""

    days: tuple[str, ...]
    train: bool  # shuffled within each day, sample_num negatives; else the evaluation protocol
    sample_num: int
    batch_size: int
    seed: int
    max_requests: int = 0  # evaluation only: the first that many requests (0: all)


def dataset_specs(prep: Prepared, num_workers: int = 1) -> dict[str, DatasetSpec]:
    """The run's datasets by name: one per (epoch, training day) (up to session.EPOCH_DATASETS
    epochs), per streaming-eval day, the validation day (``run.valid_day``: the anytime points)
    and the test day (none with ``run.test_eval=false``: selection runs never see it). With
    ``run.eval_max_batches`` the evaluation datasets hold only the requests that many batches
    per worker score, so a capped evaluation costs what it evaluates."""
    from raytopk.train.session import EPOCH_DATASETS, TEST_KEY, VALID_KEY, eval_key, train_key

    cfg, d = prep.cfg, prep.cfg.data
    seed = cfg.run.seed
    present = list(prep.meta["days"])
    out = {
        # Shuffle/negatives seed from (seed, epoch, the day's place in the dataset, not in this
        # run's list: a resumed run with a longer list draws the same batches per day).
        train_key(day, epoch): DatasetSpec(
            (day,), True, d.sample_num, d.batch_size, day_seed(seed, epoch, present.index(day))
        )
        for epoch in range(min(cfg.run.epochs, EPOCH_DATASETS))
        for day in d.train_days
    }
    cap = cfg.run.eval_max_batches * d.eval_batch_size * num_workers
    evals = [(eval_key(day), day) for day in sorted(set(prep.next_day.values()))]
    if cfg.run.valid_day:
        evals.append((VALID_KEY, cfg.run.valid_day))
    if cfg.run.test_eval:  # selection trials have no test-day dataset at all
        evals.append((TEST_KEY, d.test_day))
    for key, day in evals:
        out[key] = DatasetSpec((day,), False, 0, d.eval_batch_size, seed, cap)
    return out


def day_seed(seed: int, epoch: int, day_index: int) -> int:
    """The data seed of one (epoch, day): seed + day_index in epoch 0 (what a one-pass run has
    always drawn), a SeedSequence hash of (seed, epoch, day_index) in later epochs, so a repeated
    pass sees new shuffles and negatives. Always in [0, 2^31)."""
    if epoch == 0:
        return seed + day_index
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, day_index]).generate_state(1)[0] >> 1)


def build_datasets(prep: Prepared, num_workers: int = 1) -> dict[str, Any]:
    """Ray datasets of :func:`dataset_specs` (in-batch negative sampling runs in Ray Data)."""
    from raytopk.data.pipeline import build_eval_dataset, build_train_dataset

    ray_env.configure_data_context()
    path, out = prep.cfg.data.path, {}
    for key, s in dataset_specs(prep, num_workers).items():
        if s.train:
            out[key] = build_train_dataset(
                path, list(s.days), sample_num=s.sample_num, batch_size=s.batch_size, seed=s.seed
            )
        else:
            out[key] = build_eval_dataset(
                path,
                list(s.days),
                batch_size=s.batch_size,
                seed=s.seed,
                max_requests=s.max_requests,
            )
    return out


def loop_spec(prep: Prepared, threads: int) -> LoopSpec:
    """What ``raytopk.train.loop.train_loop`` receives (the same for both backends)."""
    cfg = prep.cfg
    return LoopSpec(
        cfg=to_dict(cfg),
        vocab=dict(prep.meta["vocab"]),
        days=list(cfg.data.train_days),
        next_day=dict(prep.next_day),
        items_path=prep.items_path,
        threads=threads,
        test_day=cfg.data.test_day,
    )


def run(
    cfg: TrainConfig,
    *,
    callbacks: list[Any] | None = None,
    verbose: bool = True,
    on_report: Any = None,
    hooks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate ``cfg``: on the connected Ray cluster (an embedded local one when none
    is), or in this process with ``run.backend: local``. ``callbacks``: Ray Train callbacks
    (Ray backend); ``on_report(report)``: called after each report (local backend; the study
    forwards them to Tune); ``hooks``: more training-loop hooks (raytopk.train.hooks; local
    backend: a benchmark's measuring). Returns the final metrics (also written
    to ``<output_dir>/metrics.json``). Raises :class:`TrainingStopped` on a non-finite loss, and
    the validation errors of ``prepare`` before any worker starts."""
    t_start = time.perf_counter()
    prep = prepare(cfg)
    cfg = prep.cfg
    out = prep.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    (out / LAST_REPORT).unlink(missing_ok=True)  # a previous run's final report is not ours
    if cfg.run.backend == "local":
        use_gpu = _run_local(prep, verbose, on_report, hooks or [])
    elif hooks:
        raise ValueError("run(hooks=...) needs run.backend=local (Ray Train workers build their "
                         "hooks from the config)")
    else:
        use_gpu = _run_ray(prep, callbacks, verbose)
    return _finish(prep, use_gpu, time.perf_counter() - t_start)


def _announce(prep: Prepared, where: str) -> None:
    cfg = prep.cfg
    print(
        f"[raytopk] {cfg.run.name}: {where}, {len(cfg.data.train_days)} training day(s) "
        f"{cfg.data.train_days[0]} .. {cfg.data.train_days[-1]}, test day {cfg.data.test_day}, "
        f"output {prep.output_dir}",
        flush=True,
    )
    if prep.checkpoint is not None:
        print(f"[raytopk] resuming from {prep.checkpoint}", flush=True)


def _run_local(prep: Prepared, verbose: bool, on_report: Any = None,
               hooks: list[Any] | None = None) -> bool:  # fmt: skip
    from raytopk.train.local_session import LocalSession, local_device
    from raytopk.train.loop import train_loop

    cfg = prep.cfg
    device = local_device(cfg.scaling.use_gpu)
    per = cfg.scaling.cpus_per_worker
    threads = int(per) if per != "auto" else max(1, (os.cpu_count() or 2) - 1)  # 1 for data
    if verbose:
        _announce(prep, f"local backend on {device}, {threads} torch thread(s)")
    session = LocalSession(prep, dataset_specs(prep), device, verbose, on_report)
    train_loop(loop_spec(prep, threads), session, hooks or [])
    return device.type == "cuda"


def _run_ray(prep: Prepared, callbacks: list[Any] | None, verbose: bool) -> bool:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytopk.train.loop import train_fn_per_worker

    cfg, out = prep.cfg, prep.output_dir
    ray_env.init_ray()
    plan = plan_resources(
        ray.cluster_resources(),
        num_workers=cfg.scaling.num_workers,
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        use_gpu=cfg.scaling.use_gpu,
        concurrent=1,
    )
    if verbose:
        kind = "GPU" if plan.use_gpu else "CPU"
        workers = f"{cfg.scaling.num_workers} {kind} worker(s)"
        _announce(prep, f"{workers} x {plan.cpus_per_worker:g} CPU")
    resources = {"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})}
    progress = ProgressLog(out, cfg.run.name, len(cfg.model.stages), verbose, planned_samples(prep))
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_spec(prep, plan.threads).as_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS,
            storage_path=str(out),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[ray_env.progress_callback(progress), *(callbacks or [])],
        ),
        datasets=build_datasets(prep, cfg.scaling.num_workers),
    )
    trainer.fit()  # raises ray.train.TrainingFailedError when the workers fail for good
    return plan.use_gpu


def _finish(prep: Prepared, use_gpu: bool, wall_seconds: float) -> dict[str, Any]:
    """The final report → metrics.json (atomically) and curves.png; the result of ``run``."""
    from raytopk.train.events import StopReport

    cfg, out = prep.cfg, prep.output_dir
    final = read_last_report(out)
    if final is None:
        raise RuntimeError(
            f"training ended without a final report in {str(out / LAST_REPORT)!r} "
            "(see the log above)"
        )
    if final.get("kind") == StopReport.KIND:
        last = latest_checkpoint(out)
        raise TrainingStopped(
            f"{final.get('reason')}; last good checkpoint: {last if last else 'none'}"
        )
    final.pop("rank", None)
    final.update(
        {
            "name": cfg.run.name,
            "op": cfg.op.name,
            "op_params": dict(cfg.op.params),
            "loss_form": cfg.loss.form,
            "sample_num": cfg.data.sample_num,
            "num_workers": cfg.scaling.num_workers if cfg.run.backend == "ray" else 1,
            "backend": cfg.run.backend,
            "use_gpu": use_gpu,
            "din_attention": _din_attention(cfg, use_gpu),
            "wall_seconds": round(wall_seconds, 3),
            "output_dir": str(out),
            "checkpoint": str(latest_checkpoint(out) or ""),
        }
    )
    tmp = out / "metrics.json.tmp"  # never a half-written metrics.json
    tmp.write_text(json.dumps(final, indent=2, default=str) + "\n")
    tmp.replace(out / "metrics.json")
    stages = len(cfg.model.stages)
    plot_curves(out / "progress.csv", out / "curves.png", f"{cfg.run.name} ({cfg.op.name})", stages)
    return final


def _din_attention(cfg: TrainConfig, use_gpu: bool) -> str | None:
    """The attention path the run's DIN stages used (None without one): model.attention
    resolved for the device the workers trained on."""
    from raytopk.models.attention import resolve_impl

    if "din" not in cfg.model.stages:
        return None
    return resolve_impl(cfg.model.attention, "cuda" if use_gpu else "cpu")


def load_run_config(output_dir: str | Path) -> TrainConfig:
    """The resolved config a run saved in its output directory."""
    return from_dict(yaml.safe_load((Path(output_dir) / "config.yaml").read_text()))
