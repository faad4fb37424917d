"""How measuring attaches to the training loop: a :class:`Hook` is told what the loop does, at
seven points, and may report, evaluate or stop it. The loop itself only trains.

    start(t)                      once, before the first step (after a resume too)
    day_start(t, batches)         a training day's batches are open
    before_batch(t)               before each batch is fetched
    wants_stop(t) -> bool         before each step: stop here? (all ranks agree, see Trainer.step)
    phase(name)                   inside a step, after "forward", "backward", "optimizer"
    after_step(t, batch, step)    after each trained step (``t.pos`` already advanced)
    end(t)                        training is over, before the test day's evaluation
    final(t, test) -> dict        fields for the final report (``test``: the test day's metrics)

``t`` is the loop's :class:`raytopk.train.trainer.Trainer` (model, optimiser, position, and
``t.report`` / ``t.evaluate``). The run's own hooks come from ``run_hooks`` (the step clock,
the step reports, periodic checkpoints, the budget, the anytime points of the config); a
benchmark adds its own (``raytopk.train.measure.PhaseTimer``: the step-time split) through
``train_loop(spec, session, hooks=...)``. Hooks run in list order; the step clock comes first,
so that the time the others take between two steps is never training time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raytopk.data.batch import CascadeBatch
    from raytopk.data.loader import CascadeBatches
    from raytopk.train.trainer import Step, Trainer

__all__ = ["Hook", "Hooks"]


class Hook:
    """Every method is optional: a hook overrides the points it needs."""

    def start(self, t: Trainer) -> None:
        pass

    def day_start(self, t: Trainer, batches: CascadeBatches) -> None:
        pass

    def before_batch(self, t: Trainer) -> None:
        pass

    def wants_stop(self, t: Trainer) -> bool:
        return False

    def phase(self, name: str) -> None:
        pass

    def after_step(self, t: Trainer, batch: CascadeBatch, step: Step) -> None:
        pass

    def end(self, t: Trainer) -> None:
        pass

    def final(self, t: Trainer, test: dict[str, float]) -> dict[str, Any]:
        return {}


class Hooks(Hook):
    """Several hooks as one, called in order."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def start(self, t: Trainer) -> None:
        for h in self.hooks:
            h.start(t)

    def day_start(self, t: Trainer, batches: CascadeBatches) -> None:
        for h in self.hooks:
            h.day_start(t, batches)

    def before_batch(self, t: Trainer) -> None:
        for h in self.hooks:
            h.before_batch(t)

    def wants_stop(self, t: Trainer) -> bool:
        return any([h.wants_stop(t) for h in self.hooks])  # every hook asked

    def phase(self, name: str) -> None:
        for h in self.hooks:
            h.phase(name)

    def after_step(self, t: Trainer, batch: CascadeBatch, step: Step) -> None:
        for h in self.hooks:
            h.after_step(t, batch, step)

    def end(self, t: Trainer) -> None:
        for h in self.hooks:
            h.end(t)

    def final(self, t: Trainer, test: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for h in self.hooks:
            out.update(h.final(t, test))
        return out
