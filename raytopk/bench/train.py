"""The plain training loop jobs/bench_train.py measures the Ray path against (the throughput target
of docs/protocol.md §5.3): the same day's batches, produced by the same pipeline but materialised in
memory first (``materialise``), fed to a plain single-process PyTorch loop (``plain_throughput``:
same model, operator, batch size, loss step and optimiser as the Ray worker; the caller sets the
torch thread count).

Notation: B = batch size (requests per batch), N = candidates per request.

Ray, Ray Data and the training modules are imported inside the functions, so importing
raytopk.bench stays free of Ray.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["materialise", "plain_throughput"]


def materialise(
    path: str, day: str, *, sample_num: int, batch_size: int, seed: int, max_batches: int = 0
) -> list:
    """The CascadeBatches the Ray path would train on (the pipeline's own transforms, read by the
    local backend's reader: the same batches as a 1-worker Ray run), in memory."""
    from raytopk.data.batch import collate
    from raytopk.data.local import iter_local_groups

    out = []
    groups = iter_local_groups(
        path, [day], train=True, sample_num=sample_num, batch_size=batch_size, seed=seed
    )
    for g in groups:
        out.append(collate(g))
        if max_batches and len(out) >= max_batches:
            break
    return out


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
    """Samples/s of the plain single-process loop over in-memory ``batches`` (after warm-up)."""
    from raytopk.train.loop import _loss_step
    from raytopk.train.model import CascadeModel

    torch.manual_seed(cfg.run.seed)
    model = CascadeModel.from_config(cfg, vocab, device).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    rows = secs = 0.0
    steps = 0
    t_all = time.perf_counter()
    i = 0
    while True:
        batch = batches[i % len(batches)].to(device)
        t = time.perf_counter()
        total, _ = _loss_step(model, batch)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if i >= warmup:
            rows += batch.batch_size
            secs += dt
            steps += 1
        i += 1
        done_pass = i >= len(batches) + warmup if not max_steps else steps >= max_steps
        if done_pass or (max_seconds and time.perf_counter() - t_all > max_seconds and steps):
            break
    return {
        "samples_per_s": rows / max(secs, 1e-9),
        "s_per_step": secs / max(steps, 1),
        "steps": steps,
    }
