"""The plain training loop jobs/bench_train.py measures the Ray path against (the throughput target
of docs/protocol.md §5.3): the same day's batches, produced by the same pipeline but materialised in
memory first (``materialise``), fed to the same training loop in one process, without a data
pipeline (``plain_throughput``: ``raytopk.train.loop.train_loop`` with an in-memory session and a
step timer hook; the caller sets the torch thread count).

Notation: B = batch size (requests per batch), N = candidates per request.

Ray, Ray Data and the training modules are imported inside the functions, so importing
raytopk.bench stays free of Ray.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from raytopk.train.hooks import Hook

__all__ = ["materialise", "plain_throughput"]


def materialise(
    path: str, day: str, *, sample_num: int, batch_size: int, seed: int, max_batches: int = 0
) -> list:
    """The CascadeBatches the Ray path would train on (the pipeline's own transforms, read by the
    local backend's reader: the same batches as a 1-worker Ray run), in memory."""
    from raytopk.data.batch import collate
    from raytopk.data.local_reader import iter_local_groups

    out = []
    groups = iter_local_groups(
        path, [day], train=True, sample_num=sample_num, batch_size=batch_size, seed=seed
    )
    for g in groups:
        out.append(collate(g))
        if max_batches and len(out) >= max_batches:
            break
    return out


class _InMemory:
    """A training session (raytopk.train.session.Session) over batches already in memory: every
    dataset is ``batches``, nothing is restored, reports and checkpoints are dropped."""

    rank, world = 0, 1

    def __init__(self, batches: list, device: torch.device) -> None:
        self.batches, self.device = batches, device

    def restored(self, load: Any) -> None:
        return None

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def dataset(self, key: str, batch_size: int, prefetch: int) -> Any:
        return lambda: iter(self.batches)

    def report(self, report: Any, write_checkpoint: Any = None, name: str | None = None) -> None:
        pass


class _StepTimer(Hook):
    """Times each step from its host-to-device copy to the end of Adam, after ``warmup`` steps;
    stops training after ``steps`` timed steps or ``max_seconds`` of wall time."""

    def __init__(self, device: torch.device, warmup: int, steps: int, max_seconds: float) -> None:
        self.device, self.warmup, self.steps, self.max_seconds = device, warmup, steps, max_seconds
        self.done = self.rows = 0
        self.seconds, self.t0, self.began = 0.0, 0.0, time.perf_counter()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def phase(self, name: str) -> None:
        if name == "h2d":
            self.t0 = self._now()

    def after_step(self, t: Any, batch: Any, step: Any) -> None:
        dt = self._now() - self.t0
        self.done += 1
        if self.done > self.warmup:
            self.rows += batch.batch_size
            self.seconds += dt

    def wants_stop(self, t: Any) -> bool:
        timed = self.done - self.warmup
        late = self.max_seconds and time.perf_counter() - self.began > self.max_seconds
        return timed >= self.steps or bool(late and timed > 0)


def plain_throughput(
    cfg: Any,
    vocab: dict[str, int],
    batches: list,
    *,
    warmup: int = 3,
    max_steps: int = 0,
    max_seconds: float = 0.0,
    device: str = "cpu",
) -> dict[str, float]:
    """Samples/s of the training loop (``raytopk.train.loop.train_loop``, one process) over the
    in-memory ``batches`` after ``warmup`` steps: ``max_steps`` steps, else one pass."""
    from raytopk.train.config import to_dict
    from raytopk.train.loop import train_loop
    from raytopk.train.session import LoopSpec

    dev = torch.device(device)
    run = replace(cfg.run, epochs=1000, test_eval=False, max_samples=0, max_train_seconds=0,
                  eval_points=0, eval_at_samples=[], stream_eval=False, corpus_ms=[],
                  report_every_steps=10**9, checkpoint_every_steps=0)  # fmt: skip
    spec = LoopSpec(cfg=to_dict(replace(cfg, run=run)), vocab=dict(vocab), days=["memory"],
                    threads=torch.get_num_threads())  # fmt: skip
    timer = _StepTimer(dev, warmup, max_steps or len(batches), max_seconds)
    train_loop(spec, _InMemory(batches, dev), hooks=[timer])
    return {
        "samples_per_s": timer.rows / max(timer.seconds, 1e-9),
        "s_per_step": timer.seconds / max(timer.done - warmup, 1),
        "steps": max(timer.done - warmup, 0),
    }
