"""What one worker's training loop carries (:class:`Trainer`): its place in the group, the model
and optimiser, the position, the session; one training step, and the reports the loop makes
itself (a day done, a stop, the final one).

Notation: B = requests per batch, N = candidates per request (40 own slots + sample_num sampled
negatives), S = cascade stages (retrieval DSSM, pre-rank DIN, ...).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raytopk.data.batch import CascadeBatch
from raytopk.data.loader import CascadeBatches
from raytopk.losses.forms import is_operator
from raytopk.models.attention import resolve_impl
from raytopk.models.attention import warmup as warmup_attention
from raytopk.ops import warmup as warmup_op
from raytopk.progress import Progress
from raytopk.train.checkpoint import Position, load_state, rng_state, save_state, set_rng_state
from raytopk.train.config import TrainConfig
from raytopk.train.evaluate import evaluate
from raytopk.train.events import DayReport, FinalReport, Report, StopReport, Where
from raytopk.train.hooks import Hook, Step
from raytopk.train.measure import LossWindow
from raytopk.train.model import CascadeModel, param_digest
from raytopk.train.session import LoopSpec, Session, eval_key, train_key

__all__ = ["Trainer"]


class Trainer:
    """One worker's run. ``start`` builds it (Ray steps 1-3 of the session: place, resume,
    model); the loop then asks it for each day's batches, each step, and the reports."""

    def __init__(self, cfg: TrainConfig, spec: LoopSpec, session: Session, model: Any,
                 pos: Position, init_digest: str) -> None:  # fmt: skip
        self.cfg, self.spec, self.session, self.model, self.pos = cfg, spec, session, model, pos
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.cascade: CascadeModel = model.module if hasattr(model, "module") else model
        self.init_digest = init_digest  # the same for every op at one seed (pairing)
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(self.cascade.scorers.parameters()), "name": "scorers"},
                {"params": list(self.cascade.loss.parameters()), "name": "loss_weights"},
            ],
            lr=cfg.optim.lr,
        )
        self.schedule = [(e, d) for e in range(cfg.run.epochs) for d in spec.days]
        self.at = self.schedule[min(pos.item, len(self.schedule) - 1)] if self.schedule else (0, "")
        self.day_losses, self.day_samples, self.day_t0 = LossWindow(), 0, time.perf_counter()
        self._upcoming: dict[int, CascadeBatches] = {}  # the next day's batches, warmed

    @classmethod
    def start(cls, cfg: TrainConfig, spec: LoopSpec, session: Session) -> Trainer:
        """Seed, build the model, restore a checkpoint, wrap for the device, compile kernels."""
        # Same seed on every rank: identical initial parameters (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)  # noqa: NPY002  (legacy global RNG, for third-party code)
        # Ray 1: this worker's place in the group and its device (a GPU when the trainer has them).
        module = CascadeModel.from_config(cfg, spec.vocab, session.device)  # amp for the device
        init_digest = param_digest(module.scorers)
        # Ray 2: the checkpoint to continue from (after a worker failure, or a re-run), or None.
        resumed = session.restored(load_state)
        pos = Position() if resumed is None else Position.from_dict(resumed["position"])
        if resumed is not None:
            module.scorers.load_state_dict(resumed["scorers"])
            module.loss.load_state_dict(resumed["loss"])
        pos.starts += 1
        # Ray 3: move to the device and wrap in DDP (gloo on CPU, nccl on GPU).
        t = cls(cfg, spec, session, session.prepare_model(module), pos, init_digest)
        # Compile the lazy kernels now, so that budgets and step timings measure training.
        if is_operator(cfg.op.name):  # the bce baseline has no operator to compile
            warmup_op(cfg.op.name)
        if "din" in cfg.model.stages and resolve_impl(cfg.model.attention, t.device) == "fused":
            warmup_attention()  # DIN's fused attention kernels (numba), likewise
        if resumed is not None:
            t.optimizer.load_state_dict(resumed["optimizer"])  # onto the parameters' device
            set_rng_state(resumed["rng"])
            if t.rank == 0:
                print(f"[raytopk] resumed at step {pos.global_step} ({len(pos.days_done)} day(s) "
                      f"done, {pos.samples_seen:,} samples seen)", flush=True)  # fmt: skip
        return t

    # ---- data and evaluation ----

    def batches(self, key: str, batch_size: int, max_batches: int = 0) -> CascadeBatches:
        """This worker's batches of dataset ``key``."""
        # Ray 4: this worker's share of a day's dataset (Ray Data samples the negatives).
        prefetch = self.cfg.data.prefetch_batches
        source = self.session.dataset(key, batch_size, prefetch)
        # Page-locked host batches for a CUDA device, so the copy to it is truly asynchronous.
        pin = self.device.type == "cuda"
        return CascadeBatches(source, batch_size, prefetch, max_batches=max_batches, pin=pin)

    def day_batches(self, item: int) -> CascadeBatches:
        """Schedule item ``item``'s batches (a mid-day checkpoint's trained ones skipped); the
        next item's start while this one trains (not this very dataset again: one shard cannot
        be iterated twice at once)."""
        pos, bs = self.pos, self.cfg.data.batch_size
        skip = pos.step if item == pos.item else 0
        pos.item, pos.step = item, 0
        self.at = epoch, day = self.schedule[item]
        key = train_key(day, epoch)
        batches = self._upcoming.pop(item, None) or self.batches(key, bs)
        if item + 1 < len(self.schedule) and train_key(*self.schedule[item + 1][::-1]) != key:
            self._upcoming[item + 1] = self.batches(
                train_key(*self.schedule[item + 1][::-1]), bs
            ).warm_async()
        for _ in range(skip):  # trained before the checkpoint this run resumed from
            if next(batches, None) is None:
                break  # the day holds no more: the loop finds it empty and ends the day
            pos.step += 1
        self.day_losses, self.day_samples, self.day_t0 = LossWindow(), 0, time.perf_counter()
        return batches

    def close(self) -> None:
        """Stop a next day warmed but never trained (the budget spent, a stop)."""
        for left in self._upcoming.values():
            left.close()
        self._upcoming.clear()

    def evaluate(self, key: str, **corpus: Any) -> dict[str, float]:
        """Evaluate dataset ``key`` (every rank: evaluation all-reduces); rank 0 prints progress
        lines when it takes long."""
        cfg = self.cfg
        cap = cfg.run.eval_max_batches
        batches = self.batches(key, cfg.data.eval_batch_size, cap)
        progress = Progress(f"evaluating {key}", cap or None, "batches", enabled=self.rank == 0)
        return evaluate(self.cascade, batches, self.device, k=cfg.loss.k_truth,
                        progress=progress, **corpus)  # fmt: skip

    # ---- one step ----

    def step(self, batch: CascadeBatch, hooks: Hook) -> Step:
        """One training step on ``batch`` (on the device): forward, the loss, backward, Adam;
        unless a hook wants training to stop (the budget) or a rank's loss is not finite.
        ``hooks.phase`` is told each phase's end (the step-time split of a benchmark).

        One small collective per step: every rank learns whether any rank saw a non-finite
        loss or wants to stop, so all stop at the same step, and the global sample count.
        (A rank quitting alone would leave the others blocked in DDP.)"""
        pos = self.pos
        stop = hooks.wants_stop(self)
        total, parts = self.model(batch)  # every stage's scores and the joint loss
        flags = torch.stack(
            [
                (~torch.isfinite(total.detach())).double(),
                torch.tensor(float(stop), device=total.device, dtype=torch.float64),
                torch.tensor(float(batch.batch_size), device=total.device, dtype=torch.float64),
            ]
        )
        if self.world > 1:
            dist.all_reduce(flags)
        n_bad, n_stop, global_rows = flags.tolist()
        hooks.phase("forward")
        if n_bad > 0:
            epoch, day = self.at
            vals = {"total": float(total.detach())}
            vals.update({k: float(v) for k, v in parts.items()})
            why = (
                f"non-finite loss at global step {pos.global_step + 1} (epoch {epoch}, day "
                f"{day}, step {pos.step + 1} of the day) on {int(n_bad)} of {self.world} "
                f"worker(s); loss parts on worker {self.rank}: "
                + ", ".join(f"{k}={v:.6g}" for k, v in vals.items())
            )
            return Step("non_finite", 0, total, parts, why)
        if n_stop > 0:
            return Step("stop", 0, total, parts)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()  # DDP all-reduces gradients here
        hooks.phase("backward")
        self.optimizer.step()
        hooks.phase("optimizer")
        pos.advance(int(global_rows))
        self.day_losses.add(total, parts, batch.batch_size)
        self.day_samples += int(global_rows)
        return Step("ok", int(global_rows), total, parts)

    # ---- reports ----

    def where(self) -> Where:
        epoch, day = self.at
        pos, days = self.pos, self.spec.days
        index = days.index(day) if day in days else -1
        return Where(self.rank, epoch, day, index, len(days), pos.step, pos.global_step,
                     pos.samples_seen, round(pos.train_seconds, 3))  # fmt: skip

    def report(self, report: Report, checkpoint: str = "") -> None:
        """``report`` (every rank, the same number of times); with ``checkpoint`` (a name's
        last part: "day", "step", "budget") rank 0 also writes a checkpoint."""
        # Ray 5: every rank reports; rank 0's checkpoint goes with it.
        if not checkpoint:
            self.session.report(report)
            return
        epoch, day = self.at
        name = f"checkpoint_{self.pos.global_step:09d}_e{epoch}_{day}_{checkpoint}"
        self.session.report(report, self._checkpoint_writer(), name)

    def _checkpoint_writer(self) -> Any:
        """Rank 0's checkpoint writer; None on the other ranks."""
        if self.rank != 0:
            return None
        state = {
            "scorers": self.cascade.scorers.state_dict(),
            "loss": self.cascade.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "position": self.pos.to_dict(),
            "config": self.spec.cfg,
        }
        return lambda directory: save_state(directory, state)

    def end_day(self, item: int) -> None:
        """A day done: every rank evaluates the next day (``run.stream_eval``), then reports;
        rank 0 checkpoints."""
        epoch, day = self.at
        pos, next_day = self.pos, self.spec.next_day
        pos.item, pos.step = item + 1, 0
        pos.days_done.append(f"{epoch}:{day}")
        seconds = round(time.perf_counter() - self.day_t0, 3)
        stream_day, stream = "", {}
        if self.cfg.run.stream_eval and day in next_day:
            stream_day, stream = next_day[day], self.evaluate(eval_key(next_day[day]))
        self.report(DayReport(self.where(), self.day_losses.means(), self.day_samples, seconds,
                              stream_day, stream), checkpoint="day")  # fmt: skip

    def stop(self, reason: str) -> None:
        """A non-finite loss: no checkpoint (the latest one stays the last good state)."""
        if self.rank == 0:
            print(f"[raytopk] stopping: {reason}", flush=True)
        self.report(StopReport(self.where(), reason))

    def final(self, test: dict[str, float], eval_seconds: float, extra: dict[str, Any]) -> None:
        """The final report: the test day's metrics and what the run was."""
        pos, cascade = self.pos, self.cascade
        run = {
            "eval_seconds": round(eval_seconds, 3),
            "days_trained": list(pos.days_done),
            "starts": pos.starts,
            "budget_spent": pos.budget_spent,
            "num_parameters": sum(p.numel() for p in cascade.scorers.parameters()),
            "amp": str(cascade.amp_dtype).removeprefix("torch.") if cascade.amp_dtype else "off",
            "param_digest": param_digest(cascade),
            "loss_weights": [
                float(v) for p in cascade.loss.parameters() for v in p.detach().cpu().reshape(-1)
            ],
            **extra,
            "init_param_digest": self.init_digest,
            "test_day": self.spec.test_day,
        }
        self.at = self.schedule[-1] if self.schedule else (0, "")
        self.report(FinalReport(self.where(), test, run))
