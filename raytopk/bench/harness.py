"""Timing and memory harness of the benchmarks: wall time of a call (``time_fn``), interleaved
rounds in a shuffled order (``interleaved``) and the extra peak memory of one call
(``peak_memory``).

Timing: each timing is the median of repeated calls after warm-up, with
``torch.cuda.synchronize()`` around every call on CUDA; the number of repeats is capped by a time
budget per measurement.

Peak memory (``peak_memory``), measured in a separate pass after all timings, for one
forward+backward call (inputs and label already allocated, so it is the *extra* memory):
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call (tensors of torch's caching allocator only).
- CPU (Linux): the rise of the process's resident-set high-water mark: VmHWM from
  /proc/self/status after the call (reset through /proc/self/clear_refs = 5 just before) minus
  VmRSS before. glibc's mmap threshold is pinned to 64 KiB for this pass so freed tensors go back
  to the OS instead of a malloc free list (which would hide them). It therefore counts every
  allocation of 64 KiB or more touched during the call — torch tensors, numpy/numba scratch
  buffers, thread stacks — at page granularity, plus up to a few hundred KiB of small-object
  noise. Without /proc (not Linux): ``ru_maxrss`` rise, a lower bound (0 when the process was
  already higher).
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "sync",
    "time_fn",
    "interleaved",
    "interleaved_times",
    "round_orders",
    "calibrated_interleaved",
    "timing_record",
    "peak_memory",
]

_MMAP_PINNED = False


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA is asynchronous: a timer alone measures the launch)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 2.0,
) -> dict[str, Any]:
    """Median wall time of ``fn()`` over up to ``repeats`` calls after ``warmup`` calls.

    Stops repeating once ``max_seconds`` of timed calls have passed (at least one timed call);
    warm-up stops early too when one call already exceeds the budget.
    """
    if repeats < 1:
        raise ValueError(f"'repeats' should be >= 1 but got {repeats}")
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if time.perf_counter() - t0 > max_seconds:
            break
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > max_seconds:
            break
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "repeats": len(times),
    }


def _pin_mmap_threshold() -> bool:
    """glibc: serve allocations >= 64 KiB by mmap and return them on free (M_MMAP_THRESHOLD = −3,
    M_TRIM_THRESHOLD = −1), so the resident set follows live tensors. Process-wide, so only the
    memory pass (after every timing) calls it."""
    global _MMAP_PINNED
    if _MMAP_PINNED:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 64 * 1024) == 1 and libc.mallopt(-1, 64 * 1024) == 1
    except (OSError, AttributeError):
        ok = False
    _MMAP_PINNED = ok
    return ok


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> dict[str, Any]:
    """Extra peak memory of one ``fn()`` call: {"bytes": int, "method": str} (module docstring)."""
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(dev)
        return {
            "bytes": int(torch.cuda.max_memory_allocated(dev) - base),
            "method": "cuda_max_memory_allocated",
        }
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs"):
        pinned = _pin_mmap_threshold()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current resident set
            before = _status_bytes("VmRSS")
            fn()
            after = _status_bytes("VmHWM")
            method = "rss_hwm_delta" + ("" if pinned else "_unpinned")
            return {"bytes": max(0, after - before), "method": method}
        except OSError:
            pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB elsewhere
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bytes": max(0, (after - before) * scale), "method": "ru_maxrss_delta_lower_bound"}


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device | str, rounds: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each fn, measured in rounds that call every fn once, in a
    fresh order each round (:func:`round_orders`): on a shared machine a burst of load hits
    every line alike, so the ratios between lines stay meaningful even when the absolute times
    drift."""
    times = interleaved_times(fns, device, rounds, warmup)
    return {name: statistics.median(ts) for name, ts in times.items()}


def round_orders(names: Sequence[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order of each round of :func:`interleaved_times`: a seeded shuffle per round, so that
    no fn always runs after the same one."""
    rng = random.Random(seed)
    out = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        out.append(order)
    return out


def interleaved_times(
    fns: dict[str, Callable[[], object]], device: torch.device | str, rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Every round's seconds per fn, for :func:`interleaved` (which keeps the medians) and for
    callers that report a spread. Each round calls the fns in a fresh order (seeded, so a run
    is repeatable): a rotation would keep every fn behind the same neighbour, and a fn that
    frees a large working set (DiffSort's) slows whichever fn runs next."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for order in round_orders(names, rounds):
        for name in order:
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def calibrated_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str,
    max_seconds: float,
    *,
    min_rounds: int,
    max_rounds: int,
    warmup: int = 3,
) -> tuple[dict[str, float], int]:
    """(median seconds per call of each fn, rounds): one untimed call of every fn (the warm-up of
    lazily compiled kernels, and a measure of one round) sizes the rounds to about
    ``max_seconds`` in all, within [min_rounds, max_rounds]; then :func:`interleaved`."""
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    once = time.perf_counter() - t0
    rounds = int(max(min_rounds, min(max_rounds, max_seconds / max(once, 1e-6))))
    return interleaved(fns, device, rounds, warmup=warmup), rounds


def timing_record(
    b: int, n: int, k: int, mode: str, med: dict[str, float], rounds: int
) -> dict[str, object]:
    """One (B, N, k, mode) row of an interleaved comparison: its rounds and every fn's median
    in milliseconds (the caller adds its ratios)."""
    return {
        "B": b,
        "N": n,
        "k": k,
        "mode": mode,
        "rounds": rounds,
        "ms": {name: round(s * 1e3, 4) for name, s in med.items()},
    }
