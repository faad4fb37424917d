"""``train_fn_per_worker``: the cascade training loop run by every Ray Train worker.

Notation: B = requests per batch, N = candidates per request (40 own slots + sample_num sampled
negatives), S = cascade stages (retrieval DSSM, pre-rank DIN, ...).

Plain PyTorch; the few Ray steps are numbered and marked ``# Ray:``. The protocol is
docs/protocol.md §4.4: train on the days in date order, one pass, shuffled within a day; Adam
(lr 1e-2) on the scorers and on the loss's uncertainty weights; loss = the joint cascade loss of
docs/protocol.md §3.1 (LCRON, §3.3, for the permutation operators)::

    L = sum_s L_s / (2 w_s^2) + L_J + log prod_s w_s

After every day: a checkpoint (models, optimiser, loss weights, RNG, position, resolved config),
reported by rank 0 while every rank calls ``ray.train.report`` the same number of times; with
``run.stream_eval`` the next day is evaluated first (docs/protocol.md §4.4, streaming variant). At
the end: evaluation on the test day (raytopk.train.evaluate, docs/protocol.md §4.5).

Resume: a checkpoint handed back by Ray (a restart after a worker failure, or a re-run of the
same ``run.output_dir``) restores every state and continues at the next day (or, for a mid-day
checkpoint, skips the batches of that day already trained). A non-finite loss stops every worker
at the same step (the check is all-reduced, so no rank waits in a collective for a rank that
quit), reports the step and the loss parts, and leaves the last good checkpoint as the latest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from raytopk.data.batch import CascadeBatch
from raytopk.data.batches import CascadeBatches
from raytopk.losses.forms import is_operator
from raytopk.models.attention import resolve_impl
from raytopk.models.attention import warmup as warmup_attention
from raytopk.ops import warmup as warmup_op
from raytopk.train.anytime import VALID_KEY, Anytime
from raytopk.train.checkpoint import Position, load_state, rng_state, save_state, set_rng_state
from raytopk.train.config import TrainConfig, from_dict
from raytopk.train.diagnostics import diagnostics
from raytopk.train.evaluate import evaluate
from raytopk.train.model import CascadeModel, param_digest
from raytopk.train.session import LoopSpec, Session

__all__ = [
    "train_fn_per_worker",
    "train_loop",
    "train_key",
    "eval_key",
    "set_threads",
    "TEST_KEY",
    "NAN_STOP",
    "EPOCH_DATASETS",
]

TEST_KEY = "test"
NAN_STOP = "non_finite_loss"


# Distinct datasets (shuffles and negatives) per training day: epochs 0..EPOCH_DATASETS-1 each
# get their own; a later epoch e replays epoch e mod EPOCH_DATASETS. Bounded because the Ray
# backend builds every dataset up front (the study asks for 1000 epochs and stops on a budget).
EPOCH_DATASETS = 16


def train_key(day: str, epoch: int = 0) -> str:
    """The dataset name of training ``day`` in ``epoch`` (raytopk.train.driver.dataset_specs)."""
    e = epoch % EPOCH_DATASETS
    return f"train_{day}" if e == 0 else f"train_e{e}_{day}"


def eval_key(day: str) -> str:
    return f"eval_{day}"


def _loss_step(
    model: torch.nn.Module, batch: CascadeBatch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One request batch through every stage and the joint loss: (total scalar, parts)."""
    return model(batch)


class _Window:
    """Running sums between two reports (loss parts on device: no sync per step)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.keys: list[str] = []
        self.steps = self.samples = 0
        self.seconds = self.wait = 0.0

    def add(self, total: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> None:
        if self.sums is None:
            self.keys = list(parts)
        vec = torch.stack([total.detach()] + [parts[k].detach().reshape(()) for k in self.keys])
        self.sums = vec.double() if self.sums is None else self.sums + vec.double()
        self.steps += 1
        self.samples += rows

    def report(self) -> dict[str, float]:
        """The window's mean loss parts, throughput and data-wait fraction."""
        secs = max(self.seconds, 1e-9)
        return {
            **self.means(),
            "samples_per_s": self.samples / secs,
            "data_wait_frac": self.wait / secs,
        }

    def means(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        vals = (self.sums / max(self.steps, 1)).tolist()
        return dict(zip(["loss", *self.keys], vals))


def _exclude(pos: Position, part: str, seconds: float) -> None:
    """Add ``seconds`` of wall time the step clock does not count to ``part``."""
    pos.excluded_seconds[part] = pos.excluded_seconds.get(part, 0.0) + seconds


def _corpus(spec: LoopSpec, cfg: TrainConfig) -> dict[str, np.ndarray] | None:
    """The item table for full-corpus retrieval recall, when the run asks for it."""
    if not (spec.items_path and cfg.run.corpus_ms):
        return None
    from raytopk.data.pipeline import load_items

    return load_items(spec.items_path)


def _json_safe(v: Any) -> Any:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v  # nan/inf as text


class _Step(NamedTuple):
    outcome: str  # "ok", "budget" (a rank's budget is spent), "non_finite" (a rank's loss)
    rows: int  # requests trained, summed over workers
    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    reason: str = ""


class _Worker:
    """What one worker's loop carries: its place, the model and optimiser, the position. Builds
    the reports' common fields, rank 0's checkpoint writer, and runs one training step."""

    def __init__(
        self, cfg: TrainConfig, spec: LoopSpec, rank: int, world: int, model: Any,
        pos: Position,
    ) -> None:
        self.cfg, self.cfg_dict, self.days = cfg, spec.cfg, list(spec.days)
        self.rank, self.world, self.model, self.pos = rank, world, model, pos
        self.cascade: CascadeModel = model.module if hasattr(model, "module") else model
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(self.cascade.scorers.parameters()), "name": "scorers"},
                {"params": list(self.cascade.loss.parameters()), "name": "loss_weights"},
            ],
            lr=self.cfg.optim.lr,
        )

    def metrics(self, kind: str, epoch: int, day: str, **extra: Any) -> dict[str, Any]:
        pos = self.pos
        return {
            "kind": kind,
            "rank": self.rank,
            "epoch": epoch,
            "day": day,
            "day_index": self.days.index(day) if day in self.days else -1,
            "num_days": len(self.days),
            "step": pos.step,
            "global_step": pos.global_step,
            "samples_seen": pos.samples_seen,
            "train_seconds": round(pos.train_seconds, 3),
            **extra,
        }

    def checkpoint(self) -> Any:
        """Rank 0's checkpoint writer for ``report``; None on the other ranks."""
        if self.rank != 0:
            return None
        state = {
            "scorers": self.cascade.scorers.state_dict(),
            "loss": self.cascade.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "position": self.pos.to_dict(),
            "config": self.cfg_dict,
        }
        return lambda directory: save_state(directory, state)

    def final_metrics(
        self, where: tuple[int, str], ev: dict[str, float], eval_seconds: float
    ) -> dict[str, Any]:
        """The final report: the test-day metrics ``ev`` and what the run was (JSON-safe)."""
        pos, cascade = self.pos, self.cascade
        m = self.metrics("final", *where, **ev)
        m["eval_seconds"] = round(eval_seconds, 3)
        m["days_trained"] = list(pos.days_done)
        m["starts"] = pos.starts
        m["budget_spent"] = pos.budget_spent
        m["excluded_seconds"] = {k: round(v, 3) for k, v in pos.excluded_seconds.items()}
        m["num_parameters"] = sum(p.numel() for p in cascade.scorers.parameters())
        m["amp"] = str(cascade.amp_dtype).removeprefix("torch.") if cascade.amp_dtype else "off"
        m["param_digest"] = param_digest(cascade)
        m["loss_weights"] = [
            float(v) for p in cascade.loss.parameters() for v in p.detach().cpu().reshape(-1)
        ]
        return {k: _json_safe(v) for k, v in m.items()}

    def step(
        self, batch: CascadeBatch, where: str, mark: Callable[[str], None] | None = None
    ) -> _Step:
        """One training step (forward, the loss, backward, Adam) unless a rank ran out of budget
        or saw a non-finite loss (``where`` names the day for that message). ``mark(phase)``,
        when given, is called after "forward", "backward" and "optimizer" (the step-time split
        of jobs/gpu_check.py; the training loop passes none).

        One small collective per step: every rank learns whether any rank saw a non-finite
        loss or ran out of budget, so all stop at the same step, and the global sample count.
        (A rank quitting alone would leave the others blocked in DDP.)"""
        pos, run = self.pos, self.cfg.run
        over = (run.max_train_seconds > 0 and pos.train_seconds >= run.max_train_seconds) or (
            run.max_samples > 0 and pos.samples_seen >= run.max_samples
        )
        total, parts = _loss_step(self.model, batch)
        flags = torch.stack(
            [
                (~torch.isfinite(total.detach())).double(),
                torch.tensor(float(over), device=total.device, dtype=torch.float64),
                torch.tensor(float(batch.batch_size), device=total.device, dtype=torch.float64),
            ]
        )
        if self.world > 1:
            dist.all_reduce(flags)
        n_bad, n_over, global_rows = flags.tolist()
        if mark is not None:
            mark("forward")
        if n_bad > 0:
            vals = {"total": float(total.detach())}
            vals.update({k: float(v) for k, v in parts.items()})
            why = (
                f"non-finite loss at global step {pos.global_step + 1} ({where}, step "
                f"{pos.step + 1} of the day) on {int(n_bad)} of {self.world} worker(s); loss "
                f"parts on worker {self.rank}: "
                + ", ".join(f"{k}={v:.6g}" for k, v in vals.items())
            )
            return _Step("non_finite", 0, total, parts, why)
        if n_over > 0:
            return _Step("budget", 0, total, parts)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()  # DDP all-reduces gradients here
        if mark is not None:
            mark("backward")
        self.optimizer.step()
        if mark is not None:
            mark("optimizer")
        return _Step("ok", int(global_rows), total, parts)


def set_threads(threads: int) -> int:
    """Bind torch's and numba's CPU threads to the worker's allotment (numba's parallel kernels
    otherwise use every core of the machine, whatever the worker reserved). Returns the count."""
    threads = max(1, threads)
    torch.set_num_threads(threads)
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return threads
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threads


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: :func:`train_loop` with Ray Train's session (``config``:
    a :class:`LoopSpec` as a dict, the form Ray Train carries)."""
    from raytopk.ray_env import RayTrainSession

    train_loop(LoopSpec.from_dict(config), RayTrainSession())


def train_loop(spec: LoopSpec, session: Session) -> None:
    """The training loop of one worker. ``spec`` is built by the driver
    (``raytopk.train.driver.loop_spec``); ``session`` does the five steps that differ between
    Ray Train (``raytopk.ray_env.RayTrainSession``) and one local process
    (``raytopk.train.local.LocalSession``), each marked ``# Ray:`` where it is called
    (raytopk.train.session)."""
    cfg = from_dict(spec.cfg)
    # Ray 1: this worker's place in the group and its device (a GPU when the trainer has them).
    rank, world, device = session.rank, session.world, session.device
    set_threads(int(spec.threads))

    # Same seed on every rank: identical initial parameters (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)  # noqa: NPY002  (legacy global RNG, for third-party code)
    module = CascadeModel.from_config(cfg, spec.vocab, device)  # optim.amp for the device
    init_digest = param_digest(module.scorers)  # the same for every op at one seed (pairing)
    # Ray 2: the checkpoint to continue from (after a worker failure, or a re-run), or None.
    resumed = session.restored(load_state)
    pos = Position() if resumed is None else Position.from_dict(resumed["position"])
    if resumed is not None:
        module.scorers.load_state_dict(resumed["scorers"])
        module.loss.load_state_dict(resumed["loss"])
    pos.starts += 1
    # Ray 3: move to the device and wrap in DDP (gloo on CPU, nccl on GPU).
    model = session.prepare_model(module)
    # Compile the operator's lazy kernels now, so that a time budget (the sample-scaling study)
    # and the step timings measure training, not a JIT compiler.
    if is_operator(cfg.op.name):  # the bce baseline has no operator to compile
        warmup_op(cfg.op.name)
    if "din" in cfg.model.stages and resolve_impl(cfg.model.attention, device) == "fused":
        warmup_attention()  # DIN's fused attention kernels (numba), likewise
    w = _Worker(cfg, spec, rank, world, model, pos)
    if resumed is not None:
        w.optimizer.load_state_dict(resumed["optimizer"])  # onto the parameters' device
        set_rng_state(resumed["rng"])
        if rank == 0:
            print(f"[raytopk] resumed at step {pos.global_step} ({len(pos.days_done)} day(s) "
                  f"done, {pos.samples_seen:,} samples seen)", flush=True)  # fmt: skip

    def batches_of(key: str, batch_size: int, max_batches: int = 0) -> CascadeBatches:
        # Ray 4: this worker's share of a day's dataset (Ray Data samples the negatives).
        prefetch = cfg.data.prefetch_batches
        source = session.dataset(key, batch_size, prefetch)
        # Page-locked host batches for a CUDA device, so the copy below is truly asynchronous.
        pin = device.type == "cuda"
        return CascadeBatches(source, batch_size, prefetch, max_batches=max_batches, pin=pin)

    def evaluate_on(key: str, **corpus: Any) -> dict[str, float]:
        batches = batches_of(key, cfg.data.eval_batch_size, cfg.run.eval_max_batches)
        return evaluate(w.cascade, batches, device, k=cfg.loss.k_truth, **corpus)

    def diagnose(batch: CascadeBatch | None) -> Callable[[], dict[str, float]] | None:
        if not cfg.run.diagnostics or batch is None:
            return None
        return lambda: diagnostics(w.cascade, batch)

    days, next_day = w.days, spec.next_day
    last_batch: CascadeBatch | None = None  # the diagnostics of the end's anytime point
    anytime = Anytime(cfg.run, pos, world, device)  # run.eval_points on run.valid_day
    schedule = [(e, d) for e in range(cfg.run.epochs) for d in days]
    window, stopped = _Window(), None
    upcoming: dict[int, CascadeBatches] = {}  # the next schedule item's batches, warmed
    model.train()
    for item in range(pos.item, len(schedule)):
        if pos.budget_spent:
            break
        epoch, day = schedule[item]
        skip = pos.step if item == pos.item else 0
        pos.item, pos.step = item, 0
        key = train_key(day, epoch)
        batches = upcoming.pop(item, None) or batches_of(key, cfg.data.batch_size)
        # Start the next day's dataset while this day trains (not this very dataset again: one
        # shard cannot be iterated twice at once).
        if item + 1 < len(schedule) and train_key(*schedule[item + 1][::-1]) != key:
            nxt = batches_of(train_key(*schedule[item + 1][::-1]), cfg.data.batch_size)
            upcoming[item + 1] = nxt.warm_async()
        day_t0, day_samples, day_loss, wait_seen = time.perf_counter(), 0, _Window(), 0.0
        # The step clock (pos.train_seconds, the budget) counts steady-state training only:
        # forward, backward, Adam and the data wait of a warm pipeline. Not counted (recorded in
        # pos.excluded_seconds): the wait for a day's first batch (the dataset's start-up),
        # reports and checkpoints, streaming evaluation. The same rule for every operator.
        t_step, first = time.perf_counter(), True
        for batch in batches:
            if first:
                now = time.perf_counter()
                _exclude(pos, "first_batch_wait", now - t_step)
                t_step, first = now, False
                wait_seen = batches.wait  # the first batch's wait is not a steady-state wait
            if pos.step < skip:  # mid-day checkpoint: these batches were trained before
                pos.step += 1
                t_step = time.perf_counter()
                continue
            batch = batch.to(device, non_blocking=True)
            step = w.step(batch, f"epoch {epoch}, day {day}")
            if step.outcome == "budget":
                pos.budget_spent = True
                break
            if step.outcome == "non_finite":
                stopped = step.reason
                break
            pos.advance(step.rows)
            last_batch = batch
            day_samples += step.rows
            window.add(step.total, step.parts, batch.batch_size)
            day_loss.add(step.total, step.parts, batch.batch_size)
            now = time.perf_counter()
            pos.train_seconds += now - t_step
            window.seconds += now - t_step
            window.wait += batches.wait - wait_seen
            anytime.observe(pos, now - t_step - (batches.wait - wait_seen))  # compute only
            t_step, wait_seen = now, batches.wait
            if anytime.due(pos):  # an anytime point: every rank evaluates the validation day
                base = w.metrics("valid", epoch, day)
                session.report(anytime.evaluate(base, pos, lambda: evaluate_on(VALID_KEY),
                                                lambda: evaluate_on(TEST_KEY), diagnose(batch)))
                t_step = time.perf_counter()  # evaluation time is not training time
                _exclude(pos, "anytime_eval", t_step - now)
                now = t_step

            if pos.global_step % cfg.run.report_every_steps == 0:
                # Ray 5: every rank reports, the same number of times.
                session.report(w.metrics("step", epoch, day, **window.report()))
                window = _Window()
            every = cfg.run.checkpoint_every_steps
            if every and pos.global_step % every == 0:
                name = f"checkpoint_{pos.global_step:09d}_e{epoch}_{day}_step"
                session.report(w.metrics("checkpoint", epoch, day), w.checkpoint(), name)
            t_step = time.perf_counter()
            _exclude(pos, "reports", t_step - now)  # the report barrier is not the next step's
        batches.close()  # a day left early (budget, non-finite loss) stops its prefetching
        if stopped is not None:
            break
        if pos.budget_spent:
            name = f"checkpoint_{pos.global_step:09d}_e{epoch}_{day}_budget"
            session.report(w.metrics("budget", epoch, day), w.checkpoint(), name)
            break
        # End of the day: every rank evaluates the next day (optional), then rank 0 checkpoints.
        pos.item, pos.step = item + 1, 0
        pos.days_done.append(f"{epoch}:{day}")
        m = w.metrics("day", epoch, day, **{f"day_{k}": v for k, v in day_loss.means().items()})
        m["day_samples"] = day_samples
        m["day_seconds"] = round(time.perf_counter() - day_t0, 3)
        if cfg.run.stream_eval and day in next_day:
            m["stream_day"] = next_day[day]
            t0 = time.perf_counter()
            ev = evaluate_on(eval_key(next_day[day]))
            _exclude(pos, "stream_eval", time.perf_counter() - t0)
            m.update({f"stream_{k}": v for k, v in ev.items()})
        name = f"checkpoint_{pos.global_step:09d}_e{epoch}_{day}_day"
        session.report(m, w.checkpoint(), name)

    for left in upcoming.values():  # a next day warmed but never trained (budget spent)
        left.close()
    if stopped is not None:
        if rank == 0:
            print(f"[raytopk] stopping: {stopped}", flush=True)
        # No checkpoint: the latest one stays the last good state.
        session.report(w.metrics(NAN_STOP, *schedule[pos.item], reason=stopped))
        return

    # Final evaluation on the test day (docs/protocol.md §4.5), with the item corpus for full-corpus
    # recall.
    items = _corpus(spec, cfg)
    last = schedule[min(pos.item, len(schedule) - 1)] if schedule else (0, "")
    if anytime.pending():  # the last anytime point: at the end of training
        session.report(anytime.evaluate(w.metrics("valid", *last), pos,
                                        lambda: evaluate_on(VALID_KEY), None,
                                        diagnose(last_batch)))
    t0 = time.perf_counter()
    ev = {}
    if cfg.run.test_eval:  # off in selection trials: they never see the test day
        ev = evaluate_on(TEST_KEY, corpus_items=items, corpus_ms=cfg.run.corpus_ms)
        anytime.add_final_test(ev)
    final = w.final_metrics(schedule[-1] if schedule else (0, ""), ev, time.perf_counter() - t0)
    extra = {**anytime.summary(pos), "init_param_digest": init_digest}
    session.report({**final, **extra, "test_day": spec.test_day})
