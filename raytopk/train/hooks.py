"""How measuring attaches to the training loop: a :class:`Hook` is told what the loop does, at
eight points, and may report, evaluate or stop it. The loop itself only trains.

    start(t)                      once, before the first step (after a resume too)
    day_start(t, batches)         a training day's batches are open
    before_batch(t)               before each batch is fetched
    wants_stop(t) -> bool         before each step: stop here? (all ranks agree, see Trainer.step)
    phase(name)                   inside a step, after "h2d", "forward", "backward", "optimizer"
    after_step(t, batch, step)    after each trained step (``t.pos`` already advanced)
    end(t)                        training is over, before the test day's evaluation
    final(t, test) -> dict        fields for the final report (``test``: the test day's metrics)

``t`` is the run as a hook sees it (:class:`Run`: the config, the position, the model,
``t.report`` / ``t.evaluate``; ``raytopk.train.trainer.Trainer`` implements it). The run's own
hooks come from ``raytopk.train.measure.run_hooks`` (the step clock, the budget, the anytime
points, the step reports, periodic checkpoints); a benchmark adds its own
(``raytopk.train.measure.PhaseTimer``: the step-time split) through
``train_loop(spec, session, hooks=...)``. Hooks run in list order; the step clock comes first,
so that the time the others take between two steps is never training time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from raytopk.train.checkpoint import Position
from raytopk.train.config import TrainConfig
from raytopk.train.events import Report, Where

if TYPE_CHECKING:
    from raytopk.data.batch import CascadeBatch
    from raytopk.data.loader import CascadeBatches

__all__ = ["Hook", "Hooks", "Run", "Step"]


class Step(NamedTuple):
    """One step's outcome, as the loop and the hooks see it."""

    outcome: str  # "ok", "stop" (a hook wants it: the budget), "non_finite" (a rank's loss)
    rows: int  # requests trained, summed over workers
    total: torch.Tensor  # the joint loss
    parts: dict[str, torch.Tensor]  # its parts (per stage, joint, weights)
    reason: str = ""  # why, for "non_finite"


class Run(Protocol):
    """What a hook sees of the run (raytopk.train.trainer.Trainer)."""

    cfg: TrainConfig
    pos: Position
    world: int
    device: torch.device
    cascade: Any  # raytopk.train.model.CascadeModel (not wrapped in DDP)

    def where(self) -> Where: ...

    def report(self, report: Report, checkpoint: str = "") -> None: ...

    def evaluate(self, key: str, **corpus: Any) -> dict[str, float]: ...


class Hook:
    """Every method is optional: a hook overrides the points it needs."""

    def start(self, t: Run) -> None:
        pass

    def day_start(self, t: Run, batches: CascadeBatches) -> None:
        pass

    def before_batch(self, t: Run) -> None:
        pass

    def wants_stop(self, t: Run) -> bool:
        return False

    def phase(self, name: str) -> None:
        pass

    def after_step(self, t: Run, batch: CascadeBatch, step: Step) -> None:
        pass

    def end(self, t: Run) -> None:
        pass

    def final(self, t: Run, test: dict[str, float]) -> dict[str, Any]:
        return {}


class Hooks(Hook):
    """Several hooks as one, called in order."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def start(self, t: Run) -> None:
        for h in self.hooks:
            h.start(t)

    def day_start(self, t: Run, batches: CascadeBatches) -> None:
        for h in self.hooks:
            h.day_start(t, batches)

    def before_batch(self, t: Run) -> None:
        for h in self.hooks:
            h.before_batch(t)

    def wants_stop(self, t: Run) -> bool:
        return any([h.wants_stop(t) for h in self.hooks])  # every hook asked

    def phase(self, name: str) -> None:
        for h in self.hooks:
            h.phase(name)

    def after_step(self, t: Run, batch: CascadeBatch, step: Step) -> None:
        for h in self.hooks:
            h.after_step(t, batch, step)

    def end(self, t: Run) -> None:
        for h in self.hooks:
            h.end(t)

    def final(self, t: Run, test: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for h in self.hooks:
            out.update(h.final(t, test))
        return out
