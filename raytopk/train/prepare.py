"""Everything about a training run that can be checked before Ray starts (no Ray needed).

:func:`prepare` prepares synthetic data when configured, reads the dataset's ``meta.json``,
resolves and checks the training days and the test day (docs/protocol.md §4.4) and - when
``run.output_dir`` already holds a run - loads its latest checkpoint to make sure it is readable
and fits this config (the config's own values, the operator's parameters among them, are checked
by ``raytopk.train.config.validate``, which runs first). Each problem fails
fast with a message naming the path, day, key or value, before any worker starts.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytopk import ray_env
from raytopk.data.convert import missing_days, read_meta
from raytopk.train.checkpoint import CheckpointError, Position, load_state
from raytopk.train.config import ConfigError, TrainConfig, check_days, to_dict, validate

__all__ = ["CHECKPOINTS", "Prepared", "prepare", "latest_checkpoint", "planned_samples"]

CHECKPOINTS = "checkpoints"  # RunConfig name: checkpoints live in <output_dir>/checkpoints/
# Settings that change what a checkpoint's tensors mean: a resumed run must match them.
_MUST_MATCH = ("model", "op", "loss", "optim")


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


def planned_samples(prep: Prepared) -> int:
    """The training requests the run will see: the training days' requests (meta.json) times
    run.epochs, capped by run.max_samples; 0 when a time budget ends the run instead (unknown)."""
    cfg = prep.cfg
    if cfg.run.max_train_seconds > 0:
        return 0
    per_day = dict(prep.meta.get("counts", {}).get("requests_per_day", {}))
    total = sum(int(per_day.get(d, 0)) for d in cfg.data.train_days) * cfg.run.epochs
    if cfg.run.max_samples > 0:
        total = min(total, cfg.run.max_samples) if total else cfg.run.max_samples
    return total


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint Ray Train restores from ``output_dir`` (from its snapshot), or None."""
    try:
        return ray_env.checkpoint_record(Path(output_dir) / CHECKPOINTS)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def prepare(cfg: TrainConfig) -> Prepared:
    """Get a run ready before Ray starts: validate the config, generate the synthetic dataset
    when ``data.synthetic`` asks for one and it is absent, resolve and check the days, paths and
    an existing checkpoint. Raises ConfigError / ValueError / CheckpointError naming the key,
    path or day."""
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
    meta = read_meta(path, "data.path")
    present = list(meta["days"])
    if not present:
        raise ValueError(f"data.path {str(path)!r}: meta.json lists no days")

    valid = cfg.run.valid_day
    test_day = d.test_day or present[-1]
    train_days = d.train_days or [day for day in present if day < test_day and day != valid]
    # Every protocol day the run asks for, named at once with why it is absent (RecFlow's public
    # copy lacks all_stage/2024-01-13.feather: the converter records such incomplete days).
    missing = missing_days(meta, [*train_days, test_day, *([valid] if valid else [])])
    if missing:
        incomplete = meta.get("days_incomplete") or {}
        why = "; ".join(
            f"{day}: " + (f"incomplete in the raw data ({', '.join(incomplete[day])} missing)"
                          if day in incomplete else "not converted")
            for day in missing
        )
        raise ValueError(
            f"data.train_days / data.test_day: {len(missing)} day(s) absent from the dataset at "
            f"{str(path)!r}: {why} (days present: {present[0]} .. {present[-1]}, "
            f"{len(present)} days)"
        )
    if not train_days:
        raise ValueError(f"no training day before test day {test_day} in {str(path)!r}")
    d.train_days, d.test_day = train_days, test_day
    check_days(cfg)  # the config's day rules, on the days resolved from the dataset

    next_day = {}
    if cfg.run.stream_eval:
        for day in train_days:
            nxt = (_dt.date.fromisoformat(day) + _dt.timedelta(days=1)).isoformat()
            if nxt in present:
                next_day[day] = nxt

    items_path = None
    if cfg.run.corpus_ms and cfg.model.stages[0] == "dssm":
        items_path = str(path)

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
