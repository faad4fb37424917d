"""Anytime evaluation: the validation day scored at points along a run (the study's instrument),
as a training-loop hook (:class:`AnytimePoints`, raytopk.train.hooks).

Notation: P = ``run.eval_points``, budget = ``run.max_train_seconds`` (else ``run.max_samples``),
x = the training clock the budget is counted on (training seconds, else samples seen).

With P > 0 the run evaluates ``run.valid_day`` (dataset ``VALID_KEY``) when x first reaches
budget * i / P for i = 1 .. P-1, and once more when training ends (the P-th point, at the
budget). ``run.eval_at_samples`` replaces the even points by explicit sample counts (the study's
step budgets; the end stays the last point); at the points listed in ``run.test_at_samples`` the
test day is evaluated too (``test_*`` in the curve point), and with ``run.diagnostics`` every
point carries the operator's diagnostics (raytopk.train.diagnostics). Evaluation time is not
training time (the step clock, raytopk.train.measure, counts steps only).
Every rank must evaluate at the same step (evaluation all-reduces), so with several workers the
"point reached" test is all-reduced too (training seconds differ a little between ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from raytopk.train.checkpoint import Position
from raytopk.train.config import RunConfig, TrainConfig
from raytopk.train.events import ValidReport, Where
from raytopk.train.hooks import Hook, Run, Step
from raytopk.train.session import TEST_KEY, VALID_KEY

if TYPE_CHECKING:
    from raytopk.data.batch import CascadeBatch

__all__ = ["Anytime", "AnytimePoints", "budget_clock", "test_metric", "valid_metric"]


def valid_metric(key: str) -> str:
    """The name of validation-day metric ``key`` in reports (e.g. valid_joint_recall@10@20)."""
    return f"valid_{key}"


def test_metric(key: str) -> str:
    """The name of an anytime point's test-day metric ``key`` (e.g. test_joint_recall@10@20)."""
    return f"test_{key}"


def budget_clock(run: RunConfig, pos: Position) -> tuple[float, float]:
    """(where the run stands, its budget) on the clock the budget counts: training seconds
    (``run.max_train_seconds``), else samples seen (``run.max_samples``; 0: no budget)."""
    if run.max_train_seconds > 0:
        return pos.train_seconds, float(run.max_train_seconds)
    return float(pos.samples_seen), float(run.max_samples)


class Anytime:
    """The evaluation points of one worker's run and the curve evaluated so far."""

    def __init__(self, run: RunConfig, pos: Position, world: int, device: torch.device) -> None:
        self.run = run
        self.budget = budget_clock(run, pos)[1]
        self.at = sorted({float(v) for v in run.eval_at_samples if v < self.budget})
        self.test_at = {float(v) for v in run.test_at_samples}
        if self.at:
            self.points = len(self.at) + 1
        else:
            self.points = run.eval_points if self.budget > 0 else 0
        self.world, self.device = world, device
        self.done = sum(1 for t in self._thresholds() if self._clock(pos) >= t)  # resumed runs
        self.curve: list[dict[str, Any]] = pos.anytime_curve  # saved with every checkpoint
        self.eval_seconds = 0.0  # all evaluation points together

    def _clock(self, pos: Position) -> float:
        return budget_clock(self.run, pos)[0]

    def _thresholds(self) -> list[float]:
        if self.at:
            return self.at
        return [self.budget * i / self.points for i in range(1, self.points)]

    def test_due(self) -> bool:
        """Whether the point about to be evaluated is a test point (the end: ``budget``)."""
        thr = self._thresholds()
        where = thr[self.done] if self.done < len(thr) else self.budget
        return where in self.test_at

    def due(self, pos: Position) -> bool:
        """Whether an in-training evaluation point is reached (the same answer on every rank)."""
        thr = self._thresholds()
        if self.done >= len(thr):
            return False
        hit = self._clock(pos) >= thr[self.done]
        if self.world > 1:
            flag = torch.tensor([float(hit)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            hit = bool(flag.item() > 0)
        return hit

    def pending(self) -> bool:
        """Whether the last point (at the end of training) is still to evaluate."""
        return self.points > 0 and self.done < self.points

    def evaluate(
        self,
        where: Where,
        pos: Position,
        run_eval: Callable[[], dict[str, float]],
        run_test: Callable[[], dict[str, float]] | None = None,
        diagnose: Callable[[], dict[str, float]] | None = None,
    ) -> ValidReport:
        """Run one evaluation point: the validation day, the test day when ``run_test`` is
        given and this is a test point, the diagnostics; the point joins the curve."""
        import time

        t0 = time.perf_counter()
        test = run_test() if run_test is not None and self.test_due() else {}
        ev = run_eval()
        diag = diagnose() if diagnose is not None else {}
        self.done += 1
        seconds = round(time.perf_counter() - t0, 3)
        self.eval_seconds += seconds
        point = {
            "point": self.done,
            "train_seconds": round(pos.train_seconds, 3),
            "samples_seen": pos.samples_seen,
            "steps": pos.global_step,
        }
        point.update({valid_metric(k): v for k, v in ev.items() if k.startswith("joint_recall")})
        point.update({test_metric(k): v for k, v in test.items() if k.startswith("joint_recall")})
        point.update(diag)
        self.curve.append(point)
        return ValidReport(
            where,
            valid={valid_metric(k): v for k, v in ev.items()},
            test={test_metric(k): v for k, v in test.items()},
            diagnostics=diag,
            point=self.done,
            seconds=seconds,
        )

    def add_final_test(self, ev: dict[str, float]) -> None:
        """The end's test point: the run's own final test evaluation, into the last point."""
        if self.curve and self.budget in self.test_at:
            self.curve[-1].update(
                {test_metric(k): v for k, v in ev.items() if k.startswith("joint_recall")}
            )

    def summary(self) -> dict[str, Any]:
        """For the final report: the curve, its last validation metrics, the evaluation time."""
        out: dict[str, Any] = {
            "anytime_curve": list(self.curve),
            "eval_points_done": len(self.curve),
            "valid_eval_seconds": round(self.eval_seconds, 3),
        }
        if self.curve:
            out.update({k: v for k, v in self.curve[-1].items() if k.startswith("valid_")})
        return out


class AnytimePoints(Hook):
    """The run's evaluation points (``run.eval_points`` / ``run.eval_at_samples`` on
    ``run.valid_day``): every rank evaluates at the same step; rank 0's points are the curve of
    the final report."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.anytime: Anytime | None = None
        self.last_batch: CascadeBatch | None = None  # for the end point's diagnostics

    def start(self, t: Run) -> None:
        self.anytime = Anytime(self.cfg.run, t.pos, t.world, t.device)

    def _diagnose(self, t: Run, batch: CascadeBatch | None) -> Any:
        if not self.cfg.run.diagnostics or batch is None:
            return None
        from raytopk.train.diagnostics import diagnostics

        return lambda: diagnostics(t.cascade, batch)

    def after_step(self, t: Run, batch: CascadeBatch, step: Step) -> None:
        self.last_batch = batch
        if self.anytime is not None and self.anytime.due(t.pos):
            t.report(self.anytime.evaluate(t.where(), t.pos, lambda: t.evaluate(VALID_KEY),
                                           lambda: t.evaluate(TEST_KEY),
                                           self._diagnose(t, batch)))  # fmt: skip

    def end(self, t: Run) -> None:  # the last point: at the end of training
        if self.anytime is not None and self.anytime.pending():
            t.report(self.anytime.evaluate(t.where(), t.pos, lambda: t.evaluate(VALID_KEY),
                                           None, self._diagnose(t, self.last_batch)))  # fmt: skip

    def final(self, t: Run, test: dict[str, float]) -> dict[str, Any]:
        if self.anytime is None:
            return {}
        if test:
            self.anytime.add_final_test(test)
        return self.anytime.summary()
