"""The training loop's reports, typed: one dataclass per kind of report.

Every report says where training stands (:class:`Where`); each kind adds its own fields. On its
way out of the worker a report becomes one flat dict (``Report.metrics()``: the form Ray Train's
``ray.train.report`` carries, one progress.csv row, one metrics.json), with ``"kind"`` naming
its class; on the driver's side ``describe(metrics)`` turns such a dict back into its console
line without branching on the kind.

    kind             class            when
    step             StepReport       every ``run.report_every_steps`` steps (loss, throughput)
    checkpoint       CheckpointReport every ``run.checkpoint_every_steps`` steps (with a checkpoint)
    valid            ValidReport      an evaluation point of the validation day (anytime curve)
    budget           BudgetReport     the run's step or time budget spent (with a checkpoint)
    day              DayReport        a training day done (with a checkpoint)
    non_finite_loss  StopReport       a non-finite loss stopped training (no checkpoint)
    final            FinalReport      the test day's evaluation and what the run was
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from raytopk.metrics import headline_key, metric_keys

__all__ = [
    "Where",
    "Report",
    "StepReport",
    "CheckpointReport",
    "ValidReport",
    "BudgetReport",
    "DayReport",
    "StopReport",
    "FinalReport",
    "REPORTS",
    "describe",
    "is_last",
]


@dataclass(frozen=True)
class Where:
    """Where training stands when a report is made (the fields every report carries)."""

    rank: int
    epoch: int
    day: str
    day_index: int  # the day's place among the training days (-1: not a training day)
    num_days: int
    step: int  # steps of this day
    global_step: int
    samples_seen: int  # training requests, summed over workers
    train_seconds: float  # the step clock (raytopk.train.measure.StepClock)

    def text(self) -> str:
        return f"day {self.day} ({self.day_index + 1}/{self.num_days})"


def _json_safe(v: Any) -> Any:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v  # nan/inf as text


@dataclass(frozen=True)
class Report:
    """A report: where (:class:`Where`), and the kind's own fields (``fields()``)."""

    KIND: ClassVar[str] = ""
    where: Where

    def fields(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> dict[str, Any]:
        """The flat dict that leaves the worker (Ray Train, progress.csv, metrics.json)."""
        return {"kind": self.KIND, **asdict(self.where), **self.fields()}

    @staticmethod
    def line(name: str, m: dict[str, Any], num_stages: int) -> str:
        """The console line of this kind's flat dict ``m``."""
        where = f"day {m.get('day')} ({int(m.get('day_index', -1)) + 1}/{m.get('num_days')})"
        return f"[{name}] {m.get('kind')} at step {m.get('global_step')} ({where})"


@dataclass(frozen=True)
class StepReport(Report):
    """The mean loss parts of the steps since the last one, their throughput and data wait."""

    KIND: ClassVar[str] = "step"
    losses: dict[str, float] = field(default_factory=dict)  # loss, stage*/joint*/w* parts
    samples_per_s: float = 0.0  # this worker's requests per training second
    data_wait_frac: float = 0.0  # the share of those seconds spent waiting for a batch

    def fields(self) -> dict[str, Any]:
        return {**self.losses, "samples_per_s": self.samples_per_s,
                "data_wait_frac": self.data_wait_frac}  # fmt: skip

    @staticmethod
    def line(name: str, m: dict[str, Any], num_stages: int) -> str:
        parts = " ".join(
            f"{k}={m[k]:.4f}"
            for k in m
            if k.startswith(("stage", "joint", "w")) and isinstance(m[k], float)
        )
        where = f"day {m.get('day')} ({int(m.get('day_index', -1)) + 1}/{m.get('num_days')})"
        return (
            f"[{name}] {where} step {m.get('global_step')} | loss {m.get('loss', float('nan')):.4f}"
            f" ({parts}) | {m.get('samples_per_s', 0):,.0f} samples/s"
            f" | data wait {m.get('data_wait_frac', 0):.1%}"
        )


@dataclass(frozen=True)
class CheckpointReport(Report):
    KIND: ClassVar[str] = "checkpoint"


@dataclass(frozen=True)
class BudgetReport(Report):
    KIND: ClassVar[str] = "budget"


@dataclass(frozen=True)
class ValidReport(Report):
    """One evaluation point: the validation day's metrics (``valid_*``), the test day's at a
    test point (``test_*``), the operator's diagnostics (raytopk.train.diagnostics)."""

    KIND: ClassVar[str] = "valid"
    valid: dict[str, float] = field(default_factory=dict)  # valid_<metric>
    test: dict[str, float] = field(default_factory=dict)  # test_<metric>
    diagnostics: dict[str, float] = field(default_factory=dict)
    point: int = 0  # 1, 2, ... along the run
    seconds: float = 0.0  # this evaluation's wall time

    def fields(self) -> dict[str, Any]:
        return {**self.valid, **self.test, **self.diagnostics, "eval_point": self.point,
                "eval_seconds": self.seconds}  # fmt: skip


@dataclass(frozen=True)
class DayReport(Report):
    """A training day done: its mean loss parts (``day_*``), samples and seconds, and with
    ``run.stream_eval`` the next day's evaluation (``stream_*``)."""

    KIND: ClassVar[str] = "day"
    losses: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0  # wall time of the day (its start-up and reports included)
    stream_day: str = ""
    stream: dict[str, float] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"day_{k}": v for k, v in self.losses.items()}
        out.update(day_samples=self.samples, day_seconds=self.seconds)
        if self.stream_day:
            out["stream_day"] = self.stream_day
            out.update({f"stream_{k}": v for k, v in self.stream.items()})
        return out

    @staticmethod
    def line(name: str, m: dict[str, Any], num_stages: int) -> str:
        where = f"day {m.get('day')} ({int(m.get('day_index', -1)) + 1}/{m.get('num_days')})"
        line = (
            f"[{name}] {where} done: {m.get('day_samples')} samples in {m.get('day_seconds')} s,"
            f" mean loss {m.get('day_loss', float('nan')):.4f}, checkpoint {m.get('checkpoint')}"
        )
        stream = "stream_" + headline_key(num_stages)
        if stream in m:
            line += f" | next day {m.get('stream_day')} {headline_key(num_stages)} {m[stream]:.4f}"
        return line


@dataclass(frozen=True)
class StopReport(Report):
    """Training stopped on a non-finite loss (the latest checkpoint stays the last good one)."""

    KIND: ClassVar[str] = "non_finite_loss"
    reason: str = ""

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @staticmethod
    def line(name: str, m: dict[str, Any], num_stages: int) -> str:
        return f"[{name}] STOPPED: {m.get('reason')}"


@dataclass(frozen=True)
class FinalReport(Report):
    """The end: the test day's metrics and what the run was (JSON-safe: nan/inf as text)."""

    KIND: ClassVar[str] = "final"
    test: dict[str, Any] = field(default_factory=dict)  # the test day's metrics
    run: dict[str, Any] = field(default_factory=dict)  # digests, counts, the measuring hooks'

    def fields(self) -> dict[str, Any]:
        return {k: _json_safe(v) for k, v in {**self.test, **self.run}.items()}

    @staticmethod
    def line(name: str, m: dict[str, Any], num_stages: int) -> str:
        def fmt(v: Any) -> str:
            return f"{v:.4f}" if isinstance(v, float) else str(v)

        keys = [k for k in metric_keys(num_stages) if k in m]
        return f"[{name}] test day {m.get('test_day')}: " + ", ".join(
            f"{k}={fmt(m[k])}" for k in keys
        )


REPORTS: dict[str, type[Report]] = {
    c.KIND: c
    for c in (
        StepReport,
        CheckpointReport,
        ValidReport,
        BudgetReport,
        DayReport,
        StopReport,
        FinalReport,
    )  # fmt: skip
}


def describe(name: str, m: dict[str, Any], num_stages: int = 2) -> str:
    """The console line of a report's flat dict ``m`` (run ``name``)."""
    return REPORTS.get(str(m.get("kind")), Report).line(name, m, num_stages)


def is_last(m: dict[str, Any]) -> bool:
    """Whether the flat dict ``m`` is a run's last report (final, or stopped)."""
    return m.get("kind") in (FinalReport.KIND, StopReport.KIND)
