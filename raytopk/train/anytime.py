"""Anytime evaluation and steady-state throughput of one training run (the study's instrument).

Notation: P = ``run.eval_points``, budget = ``run.max_train_seconds`` (else ``run.max_samples``),
x = the training clock the budget is counted on (training seconds, else samples seen).

With P > 0 the run evaluates ``run.valid_day`` (dataset :data:`VALID_KEY`) when x first reaches
budget * i / P for i = 1 .. P-1, and once more when training ends (the P-th point, at the
budget). ``run.eval_at_samples`` replaces the even points by explicit sample counts (the study's
step budgets; the end stays the last point); at the points listed in ``run.test_at_samples`` the
test day is evaluated too (``test_*`` in the curve point), and with ``run.diagnostics`` every
point carries the operator's diagnostics (raytopk.train.diagnostics). Evaluation time is not
training time: the loop restarts its step clock after each one.
Every rank must evaluate at the same step (evaluation all-reduces), so with several workers the
"point reached" test is all-reduced too (training seconds differ a little between ranks).

Steady-state throughput: requests per training second after warm-up, the first
:data:`WARMUP_FRACTION` of the budget (first steps allocate, fill caches and prefetch queues),
so that two runs of one setting measure the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from raytopk.train.checkpoint import Position
from raytopk.train.config import RunConfig

__all__ = ["VALID_KEY", "WARMUP_FRACTION", "Anytime", "test_metric", "valid_metric"]

VALID_KEY = "valid"
WARMUP_FRACTION = 0.2


def valid_metric(key: str) -> str:
    """The name of validation-day metric ``key`` in reports (e.g. valid_joint_recall@10@20)."""
    return f"valid_{key}"


def test_metric(key: str) -> str:
    """The name of an anytime point's test-day metric ``key`` (e.g. test_joint_recall@10@20)."""
    return f"test_{key}"


class Anytime:
    """The evaluation points and the throughput counters of one worker's run."""

    def __init__(self, run: RunConfig, pos: Position, world: int, device: torch.device) -> None:
        self.by_seconds = run.max_train_seconds > 0
        self.budget = float(run.max_train_seconds if self.by_seconds else run.max_samples)
        self.at = sorted({float(v) for v in run.eval_at_samples if v < self.budget})
        self.test_at = {float(v) for v in run.test_at_samples}
        if self.at:
            self.points = len(self.at) + 1
        else:
            self.points = run.eval_points if self.budget > 0 else 0
        self.world, self.device = world, device
        self.done = sum(1 for t in self._thresholds() if self._clock(pos) >= t)  # resumed runs
        self.curve: list[dict[str, Any]] = pos.anytime_curve  # saved with every checkpoint
        self.warm: tuple[float, int] | None = None  # (train_seconds, samples) at warm-up's end
        self.max_step_seconds = 0.0
        self.steps = 0
        self.eval_seconds = 0.0  # all evaluation points together

    def _clock(self, pos: Position) -> float:
        return pos.train_seconds if self.by_seconds else float(pos.samples_seen)

    def _thresholds(self) -> list[float]:
        if self.at:
            return self.at
        return [self.budget * i / self.points for i in range(1, self.points)]

    def test_due(self) -> bool:
        """Whether the point about to be evaluated is a test point (the end: ``budget``)."""
        thr = self._thresholds()
        where = thr[self.done] if self.done < len(thr) else self.budget
        return where in self.test_at

    def observe(self, pos: Position, step_seconds: float) -> None:
        """After each training step: the warm-up mark and the longest step (``step_seconds``:
        the step's own time, without waiting for its batch)."""
        self.steps += 1
        self.max_step_seconds = max(self.max_step_seconds, step_seconds)
        warm_at = WARMUP_FRACTION * self.budget if self.budget > 0 else 0.0
        if self.warm is None and self.steps >= 2 and self._clock(pos) >= warm_at:
            self.warm = (pos.train_seconds, pos.samples_seen)

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
        base: dict[str, Any],
        pos: Position,
        run_eval: Callable[[], dict[str, float]],
        run_test: Callable[[], dict[str, float]] | None = None,
        diagnose: Callable[[], dict[str, float]] | None = None,
    ) -> dict[str, Any]:
        """Run one evaluation point; the report (``base`` + ``valid_*`` metrics, and ``test_*``
        when ``run_test`` is given and this is a test point, and the diagnostics)."""
        import time

        t0 = time.perf_counter()
        test = run_test() if run_test is not None and self.test_due() else {}
        ev = run_eval()
        diag = diagnose() if diagnose is not None else {}
        self.done += 1
        m = {**base, **{valid_metric(k): v for k, v in ev.items()}}
        m.update({test_metric(k): v for k, v in test.items()})
        m.update(diag)
        m["eval_point"] = self.done
        m["eval_seconds"] = round(time.perf_counter() - t0, 3)
        self.eval_seconds += m["eval_seconds"]
        point = {"point": self.done, "train_seconds": round(pos.train_seconds, 3),
                 "samples_seen": pos.samples_seen, "steps": pos.global_step}
        point.update({valid_metric(k): v for k, v in ev.items() if k.startswith("joint_recall")})
        point.update({test_metric(k): v for k, v in test.items() if k.startswith("joint_recall")})
        point.update(diag)
        self.curve.append(point)
        return m

    def add_final_test(self, ev: dict[str, float]) -> None:
        """The end's test point: the run's own final test evaluation, into the last point."""
        if self.curve and self.budget in self.test_at:
            self.curve[-1].update(
                {test_metric(k): v for k, v in ev.items() if k.startswith("joint_recall")}
            )

    def summary(self, pos: Position) -> dict[str, Any]:
        """For the final report: the curve, the steady-state throughput, the longest step."""
        out: dict[str, Any] = {
            "anytime_curve": list(self.curve),
            "eval_points_done": len(self.curve),
            "max_step_seconds": round(self.max_step_seconds, 4),
            "valid_eval_seconds": round(self.eval_seconds, 3),
        }
        if self.curve:
            out.update({k: v for k, v in self.curve[-1].items() if k.startswith("valid_")})
        ws, wn = self.warm if self.warm is not None else (0.0, 0)
        secs = pos.train_seconds - ws
        out["steady_samples_per_s"] = round((pos.samples_seen - wn) / secs, 3) if secs > 0 else 0.0
        return out
