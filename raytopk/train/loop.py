"""``train_loop``: the one cascade training loop, run by every Ray Train worker
(``train_fn_per_worker``), by the local backend, and by the benchmarks.

Plain PyTorch; the steps that differ between backends are the session's (raytopk.train.session)
and marked ``# Ray:`` where the :class:`~raytopk.train.trainer.Trainer` calls them. The protocol
is docs/protocol.md §4.4: train on the days in date order, one pass, shuffled within a day; Adam
(lr 1e-2) on the scorers and on the loss's uncertainty weights; loss = the joint cascade loss of
docs/protocol.md §3.1 (LCRON, §3.3, for the permutation operators)::

    L = sum_s L_s / (2 w_s^2) + L_J + log prod_s w_s

After every day: a checkpoint (models, optimiser, loss weights, RNG, position, resolved config),
reported by rank 0 while every rank reports the same number of times; with ``run.stream_eval``
the next day is evaluated first (docs/protocol.md §4.4, streaming variant). At the end:
evaluation on the test day (raytopk.train.evaluate, docs/protocol.md §4.5).

What the loop does not do itself is attached as hooks (raytopk.train.hooks): the step clock and
throughput, the budget, step reports, periodic checkpoints, anytime evaluation points
(``raytopk.train.measure.run_hooks``), and whatever a caller adds (a benchmark's step-time split).

Resume: a checkpoint handed back by the session (a restart after a worker failure, or a re-run
of the same ``run.output_dir``) restores every state and continues at the next day (or, for a
mid-day checkpoint, skips the batches of that day already trained). A non-finite loss stops every
worker at the same step, reports the step and the loss parts, and leaves the last good
checkpoint as the latest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from raytopk.train.config import from_dict
from raytopk.train.events import BudgetReport
from raytopk.train.hooks import Hook, Hooks
from raytopk.train.measure import run_hooks
from raytopk.train.session import TEST_KEY, LoopSpec, Session
from raytopk.train.trainer import Trainer

__all__ = ["set_threads", "train_fn_per_worker", "train_loop"]


def set_threads(threads: int) -> int:
    """Bind torch's and numba's CPU threads to the worker's allotment (numba's parallel kernels
    otherwise use every core of the machine, whatever the worker reserved). Returns the count."""
    import numba
    import torch

    threads = max(1, threads)
    # numba first: its first set_num_threads starts its OpenMP pool, which resets the OpenMP
    # thread count torch reads (a worker given 1 CPU then ran torch on every core).
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    return threads


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: :func:`train_loop` with Ray Train's session (``config``:
    a :class:`LoopSpec` as a dict, the form Ray Train carries)."""
    from raytopk.ray_env import RayTrainSession

    train_loop(LoopSpec.from_dict(config), RayTrainSession())


def train_loop(spec: LoopSpec, session: Session, hooks: Sequence[Hook] = ()) -> Trainer:
    """Train one worker: ``spec`` from the driver (``raytopk.train.driver.loop_spec``),
    ``session`` the backend's (Ray Train's or one local process's), ``hooks`` run after the
    config's own. Returns the trainer (its model and position) when training is over."""
    cfg = from_dict(spec.cfg)
    set_threads(int(spec.threads))
    t = Trainer.start(cfg, spec, session)
    h = Hooks([*run_hooks(cfg), *hooks])
    h.start(t)
    t.model.train()
    stopped = ""
    for item in range(t.pos.item, len(t.schedule)):
        if t.pos.budget_spent:  # a run resumed after its budget was spent trains no more
            break
        batches = t.day_batches(item)
        h.day_start(t, batches)
        while True:
            h.before_batch(t)
            batch = next(batches, None)
            if batch is None:
                break
            batch = batch.to(t.device, non_blocking=True)
            h.phase("h2d")
            step = t.step(batch, h)
            if step.outcome == "stop":
                t.pos.budget_spent = True
                break
            if step.outcome == "non_finite":
                stopped = step.reason
                break
            h.after_step(t, batch, step)
        batches.close()  # a day left early (budget, non-finite loss) stops its prefetching
        if stopped:
            break
        if t.pos.budget_spent:
            t.report(BudgetReport(t.where()), checkpoint="budget")
            break
        t.end_day(item)  # stream evaluation, the day's report and checkpoint
    t.close()
    if stopped:
        t.stop(stopped)
        return t
    h.end(t)
    # The test day (docs/protocol.md §4.5), with the item corpus for full-corpus recall.
    t0, test = time.perf_counter(), {}
    if cfg.run.test_eval:  # off in selection trials: they never see the test day
        items = _corpus(spec, cfg)
        if cfg.run.eval_threads:  # training is over: its data pipeline's CPUs are free
            set_threads(cfg.run.eval_threads)
        test = t.evaluate(TEST_KEY, corpus_items=items, corpus_ms=cfg.run.corpus_ms)
    seconds = time.perf_counter() - t0
    t.final(test, seconds, h.final(t, test))
    return t


def _corpus(spec: LoopSpec, cfg: Any) -> Any:
    """The item table for full-corpus retrieval recall, when the run asks for it."""
    if not (spec.items_path and cfg.run.corpus_ms):
        return None
    from raytopk.data.pipeline import load_items

    return load_items(spec.items_path)
