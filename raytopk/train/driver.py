"""The training driver: validate a run up front, build its datasets and a Ray Train TorchTrainer.

``run(cfg)`` is what ``jobs/train.py`` (and the Tune study) call. In order:

1. :func:`prepare` - no Ray needed: prepare synthetic data when configured, read the dataset's
   ``meta.json``, resolve and check the training days and the test day (SPEC.md §4.4), check the
   operator's parameters by building the loss once, and - when ``run.output_dir`` already holds a
   run - load its latest checkpoint to make sure it is readable and fits this config. Each problem
   fails fast with a message naming the path, day, key or value, before any worker starts.
2. :func:`resolve_resources` - GPUs when the cluster has them (``scaling.use_gpu: auto``), else
   CPU workers sized from ``ray.cluster_resources()`` so that at least one CPU stays free for Ray
   Data (RAY_NOTES.md: Train workers holding every CPU starve Ray Data, and the run hangs with no
   error).
3. one Ray dataset per training day (read in date order by the loop), one per streaming-eval day
   and one for the test day (``build_dataset``: in-batch negative sampling runs in Ray Data).
4. ``TorchTrainer`` (Ray Train V2) with ``RunConfig(storage_path=run.output_dir,
   name="checkpoints", CheckpointConfig, FailureConfig(max_failures))``; Ray restores its latest
   checkpoint when the same output_dir is run again, and after a worker failure.
5. outputs in ``run.output_dir``: ``config.yaml`` (resolved), ``progress.csv`` (one row per report,
   written live by a controller-side callback, which also prints progress to the console),
   ``checkpoints/``, ``metrics.json`` and ``curves.png``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raytopk.train.checkpoint import CheckpointError, Position, load_state
from raytopk.train.config import ConfigError, TrainConfig, dump_yaml, from_dict, to_dict, validate

__all__ = [
    "Prepared",
    "TrainingStopped",
    "prepare",
    "resolve_resources",
    "latest_checkpoint",
    "build_datasets",
    "run",
    "plot_curves",
    "load_run_config",
    "METRIC_KEYS",
]

CHECKPOINTS = "checkpoints"  # RunConfig name: checkpoints live in <output_dir>/checkpoints/
# The final (or non-finite-loss stop) report of rank 0, written by the controller-side callback.
# Ray Train V2's Result.metrics holds the metrics of the latest *checkpoint*, not the latest
# report, so the final evaluation (reported without a checkpoint) is handed over in this file.
LAST_REPORT = "last_report.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of reported checkpoints
METRIC_KEYS = (
    "joint_recall@10@20",
    "prerank_recall@10@20",
    "retrieval_recall@10@30",
    "prerank_ndcg@10",
    "retrieval_ndcg@10",
    "prerank_kendall_tau",
    "retrieval_kendall_tau",
)
# Settings that change what a checkpoint's tensors mean: a resumed run must match them.
_MUST_MATCH = ("model", "op", "loss", "optim")


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss; the message names the step and the loss parts."""


@dataclass
class Prepared:
    cfg: TrainConfig  # resolved: data.path, train_days, test_day, output_dir filled in
    meta: dict[str, Any]
    output_dir: Path
    next_day: dict[str, str] = field(default_factory=dict)  # streaming eval: day -> day + 1
    items_path: str | None = None
    checkpoint: Path | None = None  # the latest checkpoint Ray will resume from
    position: Position | None = None


# ---- validation -----------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint Ray Train restores from ``output_dir`` (from its snapshot), or None."""
    exp = Path(output_dir) / CHECKPOINTS
    snap = exp / SNAPSHOT
    if not snap.is_file():
        return None
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint record {str(snap)!r} is corrupt: {e}") from e
    if not latest:
        return None
    return exp / latest["checkpoint_dir_name"]


def _read_meta(path: Path) -> dict[str, Any]:
    from raytopk.data.convert import read_meta

    if not path.exists():
        raise FileNotFoundError(
            f"data.path {str(path)!r} does not exist: convert RecFlow with "
            "`python jobs/prepare_data.py convert ...` or set data.synthetic.enabled=true"
        )
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"data.path {str(path)!r} has no meta.json: it is not a converted raytopk dataset "
            "(point data.path at the output directory of `jobs/prepare_data.py convert`)"
        )
    return read_meta(path)


def prepare(cfg: TrainConfig) -> Prepared:
    """Validate everything that can be checked before Ray starts; resolve days and paths."""
    cfg = validate(cfg)
    d = cfg.data
    if d.synthetic.enabled and not (d.path and (Path(d.path) / "meta.json").is_file()):
        from raytopk.data.synthetic import prepare_synthetic

        t0 = time.perf_counter()
        out = prepare_synthetic(
            Path(d.synthetic.root),
            days=d.synthetic.days,
            requests_per_day=d.synthetic.requests_per_day,
            seed=d.synthetic.seed,
        )
        d.path = str(out)
        print(f"[raytopk] synthetic dataset ready at {out} ({time.perf_counter() - t0:.1f} s)")
    path = Path(d.path).resolve()
    d.path = str(path)
    meta = _read_meta(path)
    present = list(meta["days"])
    if not present:
        raise ValueError(f"data.path {str(path)!r}: meta.json lists no days")

    test_day = d.test_day or present[-1]
    if test_day not in present:
        raise ValueError(
            f"data.test_day {test_day} is not in the dataset at {str(path)!r} "
            f"(days present: {present[0]} .. {present[-1]}, {len(present)} days)"
        )
    train_days = d.train_days or [day for day in present if day < test_day]
    missing = [day for day in train_days if day not in present]
    if missing:
        raise ValueError(
            f"data.train_days: day(s) {missing} missing from the dataset at {str(path)!r} "
            f"(days present: {present})"
        )
    if not train_days:
        raise ValueError(f"no training day before test day {test_day} in {str(path)!r}")
    if test_day in train_days:
        raise ValueError(f"data.test_day {test_day} is also a training day")
    d.train_days, d.test_day = train_days, test_day

    next_day = {}
    if cfg.run.stream_eval:
        for day in train_days:
            nxt = (_dt.date.fromisoformat(day) + _dt.timedelta(days=1)).isoformat()
            if nxt in present:
                next_day[day] = nxt

    items_path = None
    if cfg.run.corpus_ms and cfg.model.stages[0] == "dssm":
        items_path = str(path)

    # The operator's parameters are checked by the loss itself (names, ranges): build it once.
    from raytopk.losses import build_loss

    try:
        build_loss(cfg.op.name, dict(cfg.op.params), list(cfg.loss.ks), k_truth=cfg.loss.k_truth)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"op {cfg.op.name} with params {cfg.op.params}: {e}") from e

    out_dir = Path(cfg.run.output_dir).resolve()
    cfg.run.output_dir = str(out_dir)
    prep = Prepared(
        cfg=cfg, meta=meta, output_dir=out_dir, next_day=next_day, items_path=items_path
    )
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        if not cfg.run.resume:
            raise ConfigError(
                f"run.output_dir {str(out_dir)!r} already holds checkpoints of a previous run "
                f"(latest {ckpt.name}); set run.resume=true to continue it, or choose another "
                "run.output_dir"
            )
        _check_resumable(prep, ckpt)
    return prep


def _schedule(cfg: TrainConfig) -> list[str]:
    return [f"{e}:{day}" for e in range(cfg.run.epochs) for day in cfg.data.train_days]


def _check_resumable(prep: Prepared, ckpt: Path) -> None:
    state = load_state(ckpt)  # CheckpointError naming the file when it is corrupt
    old = state["config"]
    new = to_dict(prep.cfg)
    for section in _MUST_MATCH:
        if old.get(section) != new[section]:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} was trained with {section}={old.get(section)} but "
                f"this run asks for {section}={new[section]}; use another run.output_dir"
            )
    pos = Position.from_dict(state["position"])
    sched = _schedule(prep.cfg)
    if pos.days_done != sched[: len(pos.days_done)]:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} has trained {pos.days_done}, which is not how this run's "
            f"schedule begins ({sched[: len(pos.days_done) + 1]}); use another run.output_dir"
        )
    prep.checkpoint, prep.position = ckpt, pos


def resolve_resources(scaling: Any, cluster: dict[str, float]) -> tuple[bool, float, int]:
    """(use_gpu, CPUs per worker, torch threads per worker) for ``scaling`` on ``cluster``
    (``ray.cluster_resources()``); ValueError naming the setting when it cannot fit."""
    total_cpu = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    n = scaling.num_workers
    use_gpu = gpus > 0 if scaling.use_gpu == "auto" else bool(scaling.use_gpu)
    if use_gpu and gpus < n:
        raise ValueError(
            f"scaling.use_gpu={scaling.use_gpu} with scaling.num_workers={n} needs {n} GPU(s); "
            f"the cluster has {gpus:g}"
        )
    # Ray Data needs CPUs of its own for reading and negative sampling (RAY_NOTES.md).
    reserve = max(1.0, 0.25 * total_cpu)
    if scaling.cpus_per_worker == "auto":
        per = (total_cpu - reserve) / n
        if per < 0.05:
            raise ValueError(
                f"the cluster has {total_cpu:g} CPU(s): too few for {n} worker(s) plus >= 1 CPU "
                "for Ray Data; lower scaling.num_workers"
            )
        per = math.floor(per * 100) / 100
    else:
        per = float(scaling.cpus_per_worker)
        if n * per > total_cpu - 1.0 + 1e-9:
            raise ValueError(
                f"scaling.cpus_per_worker={per:g} x scaling.num_workers={n} leaves less than one "
                f"of the cluster's {total_cpu:g} CPUs to Ray Data, and the run would hang "
                "(RAY_NOTES.md); lower it or use cpus_per_worker=auto"
            )
    return use_gpu, per, max(1, int(per))


# ---- datasets -------------------------------------------------------------------------------


def build_datasets(prep: Prepared) -> dict[str, Any]:
    """Ray datasets by name: one per training day, per streaming-eval day, and the test day."""
    import ray.data

    from raytopk.data.pipeline import build_dataset
    from raytopk.train.loop import TEST_KEY, eval_key, train_key

    ctx = ray.data.DataContext.get_current()
    # RAY_NOTES.md: the V2 parquet reader starts footer-reader actors on every execution
    # (11-14 s per day here); the V1 reader is ~4x faster on the same job.
    ctx.use_datasource_v2 = False
    # Same batches in the same order on a re-run: needed for an exact resume with one worker.
    ctx.execution_options.preserve_order = True

    cfg, d = prep.cfg, prep.cfg.data
    seed = cfg.run.seed
    out: dict[str, Any] = {}
    present = list(prep.meta["days"])
    for day in d.train_days:
        out[train_key(day)] = build_dataset(
            d.path,
            [day],
            split="train",
            sample_num=d.sample_num,
            batch_size=d.batch_size,
            # Per-day shuffle/negatives seed from the day's place in the dataset, not in this
            # run's list: a resumed run with a longer list draws the same batches per day.
            seed=seed + present.index(day),
        )
    for day in sorted(set(prep.next_day.values())):
        out[eval_key(day)] = build_dataset(
            d.path, [day], split="test", sample_num=0, batch_size=d.eval_batch_size, seed=seed
        )
    out[TEST_KEY] = build_dataset(
        d.path, [d.test_day], split="test", sample_num=0, batch_size=d.eval_batch_size, seed=seed
    )
    return out


# ---- progress -------------------------------------------------------------------------------


def _progress_callback_cls() -> type:
    from ray.train import UserCallback

    class ProgressCallback(UserCallback):
        """Runs in the Ray Train controller: one progress.csv row and one console line per report
        (throughput summed over workers, data wait averaged)."""

        def __init__(self, csv_path: str, run_name: str, last_path: str, verbose: bool) -> None:
            self.csv_path = csv_path
            self.run_name = run_name
            self.last_path = last_path
            self.verbose = verbose
            self.rows: list[dict[str, Any]] | None = None

        def _load(self) -> list[dict[str, Any]]:
            if self.rows is None:
                self.rows = []
                if os.path.isfile(self.csv_path):  # a resumed run appends to its history
                    with open(self.csv_path, newline="") as f:
                        self.rows = list(csv.DictReader(f))
            return self.rows

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            if not metrics:
                return
            m0 = dict(metrics[0])
            if m0.get("kind") in ("final", "non_finite_loss"):
                tmp = self.last_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(m0, f, default=str)
                os.replace(tmp, self.last_path)
            if "samples_per_s" in m0:
                m0["samples_per_s"] = sum(float(m.get("samples_per_s", 0.0)) for m in metrics)
                m0["data_wait_frac"] = sum(
                    float(m.get("data_wait_frac", 0.0)) for m in metrics
                ) / len(metrics)
            m0["time"] = round(time.time(), 3)
            m0["workers"] = len(metrics)
            if checkpoint is not None:
                m0["checkpoint"] = os.path.basename(str(checkpoint.path))
            row = {k: v for k, v in m0.items() if isinstance(v, int | float | str | bool)}
            rows = self._load()
            rows.append(row)
            header: list[str] = []
            for r in rows:
                header += [k for k in r if k not in header]
            tmp = self.csv_path + ".tmp"
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, self.csv_path)
            if self.verbose:
                print(_progress_line(self.run_name, m0), flush=True)

    return ProgressCallback


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _progress_line(name: str, m: dict[str, Any]) -> str:
    kind = m.get("kind")
    where = f"day {m.get('day')} ({int(m.get('day_index', -1)) + 1}/{m.get('num_days')})"
    if kind == "step":
        parts = " ".join(
            f"{k}={m[k]:.4f}"
            for k in m
            if k.startswith(("stage", "joint", "w")) and isinstance(m[k], float)
        )
        return (
            f"[{name}] {where} step {m.get('global_step')} | loss {m.get('loss', float('nan')):.4f}"
            f" ({parts}) | {m.get('samples_per_s', 0):,.0f} samples/s"
            f" | data wait {m.get('data_wait_frac', 0):.1%}"
        )
    if kind == "day":
        line = (
            f"[{name}] {where} done: {m.get('day_samples')} samples in {m.get('day_seconds')} s,"
            f" mean loss {m.get('day_loss', float('nan')):.4f}, checkpoint {m.get('checkpoint')}"
        )
        if "stream_joint_recall@10@20" in m:
            line += (
                f" | next day {m.get('stream_day')} joint Recall@10@20 "
                f"{m['stream_joint_recall@10@20']:.4f}"
            )
        return line
    if kind == "final":
        keys = [k for k in METRIC_KEYS if k in m]
        return f"[{name}] test day {m.get('test_day')}: " + ", ".join(
            f"{k}={_fmt(m[k])}" for k in keys
        )
    if kind == "non_finite_loss":
        return f"[{name}] STOPPED: {m.get('reason')}"
    return f"[{name}] {kind} at step {m.get('global_step')} ({where})"


def plot_curves(progress_csv: str | Path, png: str | Path, title: str = "") -> Path | None:
    """Training curves from progress.csv: loss parts, throughput / data wait, streaming recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(progress_csv)
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("kind") == "step"]
    days = [r for r in rows if r.get("kind") == "day"]

    def col(rs: list[dict[str, str]], key: str) -> list[float]:
        out = []
        for r in rs:
            try:
                out.append(float(r.get(key) or "nan"))
            except ValueError:
                out.append(float("nan"))
        return out

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = col(steps, "samples_seen")
    loss_keys = ["loss"] + sorted(
        k for k in (steps[0] if steps else {}) if k.startswith("stage") or k == "joint"
    )
    for k in loss_keys:
        axes[0].plot(x, col(steps, k), label=k)
    axes[0].set_xlabel("training samples (requests)")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(x, col(steps, "samples_per_s"), color="tab:blue")
    axes[1].set_xlabel("training samples (requests)")
    axes[1].set_ylabel("samples/s (all workers)", color="tab:blue")
    ax2 = axes[1].twinx()
    ax2.plot(x, col(steps, "data_wait_frac"), color="tab:red")
    ax2.set_ylabel("data-wait fraction", color="tab:red")
    if days and "stream_joint_recall@10@20" in days[0]:
        axes[2].plot(col(days, "samples_seen"), col(days, "stream_joint_recall@10@20"), "o-")
        axes[2].set_ylabel("next-day joint Recall@10@20")
    else:
        axes[2].plot(col(days, "samples_seen"), col(days, "day_loss"), "o-")
        axes[2].set_ylabel("mean loss of the day")
    axes[2].set_xlabel("training samples (requests)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


# ---- the run --------------------------------------------------------------------------------


def run(
    cfg: TrainConfig,
    *,
    callbacks: list[Any] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train and evaluate ``cfg`` on the connected Ray cluster; returns the final metrics (also
    written to ``<output_dir>/metrics.json``). Raises :class:`TrainingStopped` on a non-finite
    loss, and the validation errors of :func:`prepare` before any worker starts."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytopk.train.loop import NAN_STOP, train_fn_per_worker

    t_start = time.perf_counter()
    prep = prepare(cfg)
    cfg = prep.cfg
    if not ray.is_initialized():
        ray.init()
    use_gpu, cpus, threads = resolve_resources(cfg.scaling, ray.cluster_resources())
    out = prep.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    if verbose:
        where = "GPU" if use_gpu else "CPU"
        print(
            f"[raytopk] {cfg.run.name}: {cfg.scaling.num_workers} {where} worker(s) x {cpus:g} CPU,"
            f" {len(cfg.data.train_days)} training day(s) {cfg.data.train_days[0]} .. "
            f"{cfg.data.train_days[-1]}, test day {cfg.data.test_day}, output {out}",
            flush=True,
        )
        if prep.checkpoint is not None:
            print(f"[raytopk] resuming from {prep.checkpoint}", flush=True)

    last_path = out / LAST_REPORT
    last_path.unlink(missing_ok=True)  # a previous run's final report must not be read as ours
    resources = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "vocab": dict(prep.meta["vocab"]),
            "days": list(cfg.data.train_days),
            "next_day": dict(prep.next_day),
            "items_path": prep.items_path,
            "threads": threads,
            "test_day": cfg.data.test_day,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS,
            storage_path=str(out),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[
                _progress_callback_cls()(
                    str(out / "progress.csv"), cfg.run.name, str(last_path), verbose
                ),
                *(callbacks or []),
            ],
        ),
        datasets=build_datasets(prep),
    )
    trainer.fit()  # raises ray.train.TrainingFailedError when the workers fail for good
    if not last_path.is_file():
        raise RuntimeError(
            f"training ended without a final report in {str(last_path)!r} (see the log above)"
        )
    final = json.loads(last_path.read_text())
    if final.get("kind") == NAN_STOP:
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
            "sample_num": cfg.data.sample_num,
            "num_workers": cfg.scaling.num_workers,
            "use_gpu": use_gpu,
            "wall_seconds": round(time.perf_counter() - t_start, 3),
            "output_dir": str(out),
            "checkpoint": str(latest_checkpoint(out) or ""),
        }
    )
    (out / "metrics.json").write_text(json.dumps(final, indent=2, default=str) + "\n")
    plot_curves(out / "progress.csv", out / "curves.png", title=f"{cfg.run.name} ({cfg.op.name})")
    return final


def load_run_config(output_dir: str | Path) -> TrainConfig:
    """The resolved config a run saved in its output directory."""
    return from_dict(yaml.safe_load((Path(output_dir) / "config.yaml").read_text()))
