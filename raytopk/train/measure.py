"""The training loop's measuring, as hooks (raytopk.train.hooks): the step clock and the
throughput, the budget, the step reports and periodic checkpoints, the step-time split.

``run_hooks(cfg)`` is what every run gets from its config (``raytopk.train.anytime`` adds the
evaluation points); a benchmark passes more (``PhaseTimer``) to ``train_loop``.

The step clock (``pos.train_seconds``, what a time budget and samples/s count) is steady-state
training: from the request for a batch to the end of its optimiser step, the wait for a warm
pipeline's batch included. Not counted, by part in ``pos.excluded_seconds``: a day's first batch
(``first_batch_wait``: the dataset's start-up), whatever happens between two steps
(``between_steps``: reports, checkpoints, evaluation points) and between two days
(``between_days``: the day's report and checkpoint, the streaming evaluation). The same rule for
every operator.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from raytopk.train.anytime import AnytimePoints, budget_clock
from raytopk.train.checkpoint import Position
from raytopk.train.config import RunConfig, TrainConfig
from raytopk.train.events import CheckpointReport, StepReport
from raytopk.train.hooks import Hook, Run, Step

if TYPE_CHECKING:
    from raytopk.data.batch import CascadeBatch
    from raytopk.data.loader import CascadeBatches

__all__ = [
    "WARMUP_FRACTION",
    "Budget",
    "LossWindow",
    "PeriodicCheckpoints",
    "PhaseTimer",
    "StepClock",
    "StepReports",
    "run_hooks",
]

# Steady-state throughput leaves out the first WARMUP_FRACTION of the budget (the first steps
# allocate, fill caches and prefetch queues), so that two runs of one setting measure alike.
WARMUP_FRACTION = 0.2


def run_hooks(cfg: TrainConfig) -> list[Hook]:
    """The hooks a run's config asks for, the step clock first."""
    clock = StepClock(cfg.run)
    hooks: list[Hook] = [clock, Budget(cfg.run), AnytimePoints(cfg),
                         StepReports(cfg.run.report_every_steps, clock)]  # fmt: skip
    if cfg.run.checkpoint_every_steps:
        hooks.append(PeriodicCheckpoints(cfg.run.checkpoint_every_steps))
    return hooks


def _exclude(pos: Position, part: str, seconds: float) -> None:
    pos.excluded_seconds[part] = pos.excluded_seconds.get(part, 0.0) + seconds


class StepClock(Hook):
    """``pos.train_seconds``, the throughput window of the step reports, the steady-state
    throughput after warm-up and the longest step (for the final report)."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.window_seconds = self.window_wait = 0.0
        self.max_step_seconds = 0.0
        self.steps = 0
        self.warm: tuple[float, int] | None = None  # (train_seconds, samples) at warm-up's end
        self._gap = time.perf_counter()  # the end of the last step (or the loop's start)
        self._t0 = self._gap
        self._batches: CascadeBatches | None = None
        self._wait_seen, self._first = 0.0, False

    def day_start(self, t: Run, batches: CascadeBatches) -> None:
        now = time.perf_counter()
        _exclude(t.pos, "between_days", now - self._gap)
        self._gap = now
        self._batches, self._wait_seen, self._first = batches, batches.wait, True

    def before_batch(self, t: Run) -> None:
        now = time.perf_counter()
        _exclude(t.pos, "between_steps", now - self._gap)
        self._t0 = now

    def after_step(self, t: Run, batch: CascadeBatch, step: Step) -> None:
        now = time.perf_counter()
        seen = self._batches.wait if self._batches is not None else 0.0
        wait, self._wait_seen = seen - self._wait_seen, seen
        seconds = now - self._t0
        if self._first:  # a day's first batch: the dataset's start-up, not a steady wait
            _exclude(t.pos, "first_batch_wait", wait)
            seconds, wait, self._first = seconds - wait, 0.0, False
        t.pos.train_seconds += seconds
        self.window_seconds += seconds
        self.window_wait += wait
        self.steps += 1
        self.max_step_seconds = max(self.max_step_seconds, seconds - wait)  # compute only
        at, budget = budget_clock(self.run, t.pos)
        if self.warm is None and self.steps >= 2 and at >= WARMUP_FRACTION * budget:
            self.warm = (t.pos.train_seconds, t.pos.samples_seen)
        self._gap = now

    def take_window(self) -> tuple[float, float]:
        """(seconds, data-wait seconds) since the last call."""
        out = (self.window_seconds, self.window_wait)
        self.window_seconds = self.window_wait = 0.0
        return out

    def final(self, t: Run, test: dict[str, float]) -> dict[str, Any]:
        pos = t.pos
        ws, wn = self.warm if self.warm is not None else (0.0, 0)
        secs = pos.train_seconds - ws
        return {
            "max_step_seconds": round(self.max_step_seconds, 4),
            "steady_samples_per_s": round((pos.samples_seen - wn) / secs, 3) if secs > 0 else 0.0,
            "excluded_seconds": {k: round(v, 3) for k, v in pos.excluded_seconds.items()},
        }


class Budget(Hook):
    """Stop once ``run.max_train_seconds`` of the step clock, or ``run.max_samples``, is spent."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run

    def wants_stop(self, t: Run) -> bool:
        at, budget = budget_clock(self.run, t.pos)
        return budget > 0 and at >= budget


class LossWindow:
    """Running sums of the loss parts over some steps (on the device: no sync per step)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.keys: list[str] = []
        self.steps = self.samples = 0

    def add(self, total: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> None:
        if self.sums is None:
            self.keys = list(parts)
        vec = torch.stack([total.detach()] + [parts[k].detach().reshape(()) for k in self.keys])
        self.sums = vec.double() if self.sums is None else self.sums + vec.double()
        self.steps += 1
        self.samples += rows

    def means(self) -> dict[str, float]:
        """{"loss": mean total, part: mean part}; {} before the first step."""
        if self.sums is None:
            return {}
        vals = (self.sums / max(self.steps, 1)).tolist()
        return dict(zip(["loss", *self.keys], vals))


class StepReports(Hook):
    """Every ``every`` steps: a StepReport (mean loss parts, this worker's samples/s and data
    wait over the clock's window). Every rank reports, the same number of times."""

    def __init__(self, every: int, clock: StepClock) -> None:
        self.every, self.clock = every, clock
        self.window = LossWindow()

    def after_step(self, t: Run, batch: CascadeBatch, step: Step) -> None:
        self.window.add(step.total, step.parts, batch.batch_size)
        if t.pos.global_step % self.every:
            return
        seconds, wait = self.clock.take_window()
        secs = max(seconds, 1e-9)
        t.report(StepReport(t.where(), self.window.means(), self.window.samples / secs,
                            wait / secs))  # fmt: skip
        self.window = LossWindow()


class PeriodicCheckpoints(Hook):
    """A checkpoint every ``every`` steps (``run.checkpoint_every_steps``), mid-day."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self, t: Run, batch: CascadeBatch, step: Step) -> None:
        if t.pos.global_step % self.every == 0:
            t.report(CheckpointReport(t.where()), checkpoint="step")


class PhaseTimer(Hook):
    """The step-time split of a benchmark: data wait (the batch's fetch), host-to-device copy,
    forward + loss, backward, optimiser, in seconds summed over the steps after the first
    ``skip``; ``sync()`` waits for the device before each reading (a benchmark's cost: only for
    short profiled runs)."""

    PHASES = ("data_wait", "h2d", "forward", "backward", "optimizer")

    def __init__(self, sync: Any = None, skip: int = 0) -> None:
        self.sync = sync or (lambda: None)
        self.skip, self.seen = skip, 0
        self.sums = dict.fromkeys(self.PHASES, 0.0)
        self._t = 0.0
        self._batches: CascadeBatches | None = None
        self._wait = 0.0

    def _lap(self) -> float:
        self.sync()
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt

    def day_start(self, t: Run, batches: CascadeBatches) -> None:
        self._batches = batches

    def before_batch(self, t: Run) -> None:
        self._lap()
        self._wait = self._batches.wait if self._batches is not None else 0.0

    def phase(self, name: str) -> None:
        dt = self._lap()
        if self.seen < self.skip:
            return
        if name == "h2d" and self._batches is not None:  # the fetch, then the copy
            wait = self._batches.wait - self._wait
            self.sums["data_wait"] += wait
            dt -= wait
        self.sums[name] += dt

    def after_step(self, t: Run, batch: CascadeBatch, step: Step) -> None:
        self.seen += 1

    def mean_ms(self) -> dict[str, float]:
        n = max(self.seen - self.skip, 1)
        return {p: round(1e3 * v / n, 3) for p, v in self.sums.items()}
