"""Operator-level benchmark of the differentiable top-k operators (issue 2, "Benchmark";
SPEC.md §5 asks for the sweeps the DFTopK paper, Zhu et al. arXiv 2510.11472, lacks).

Notation: B = rows (requests), N = scores per row, k = selected per row, τ = DFTopK temperature,
x_[1] ≥ … ≥ x_[N] a row's order statistics.

Lines measured side by side in one run, on one (B, N) float tensor of standard-normal scores:

- every registered operator (``list_ops()``), at its RecFlow-protocol parameter (registry
  ``default``); DFTopK through ``dftopk_logits`` (what its BCE-with-logits loss uses);
- ``authors_dftopk``, the authors' formulation of DFTopK as a reference: two k-th-order-statistic
  calls, ``torch.kthvalue`` for x_[k] and x_[k+1], autograd through both, then
  z = (x − (x_[k] + x_[k+1]) / 2) / τ (σ(z) is the membership);
- ``elementwise_floor``: one BCE-with-logits pass over the same tensor (x / τ against the label),
  the cost no top-k loss can go below.

Modes: ``forward`` = the operator's output only (gradients enabled, as in training; the floor's
forward is its loss); ``forward_backward`` = output, BCE against a hard top-k label (of an
independent random priority), backward to the scores. BCE-with-logits for the logit lines
(dftopk, authors_dftopk, floor), BCE on the membership for the others. Each timing is the median
of repeated calls after warm-up, with ``torch.cuda.synchronize()`` around every call on CUDA;
the number of repeats is capped by a time budget per measurement.

Skips, recorded instead of run:
- memory: ``estimate_bytes`` (O(N²) ops: B·N·N·itemsize·6, the soft permutation, its logits and
  their gradients; O(N³) DiffSort: B·N·N·itemsize·(N/2 + 6), autograd keeps one (N/2, N) slice
  per layer; others B·N·itemsize·8) above ``mem_budget_gb`` → ``needed_bytes``;
- time: a line's time extrapolated from its largest smaller measured shape (fastest call minus
  0.25 ms of fixed overhead, scaled linearly in B·N^e with e from the registry's complexity, plus
  the overhead) above ``time_budget_s`` → ``estimated_s``.

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
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "Line",
    "authors_dftopk_logits",
    "authors_dftopk",
    "elementwise_floor_loss",
    "estimate_bytes",
    "complexity_exponent",
    "time_fn",
    "peak_memory",
    "machine_info",
    "build_lines",
    "operator_configs",
    "bench_operators",
    "measure_memory",
    "sync",
    "fmt_bytes",
    "markdown_operator_tables",
]

_MMAP_PINNED = False


# ---- reference formulations ------------------------------------------------------------------


def authors_dftopk_logits(x: torch.Tensor, k: int, tau: float = 1.0) -> torch.Tensor:
    """The authors' DFTopK logits: x_[k] and x_[k+1] from two ``torch.kthvalue`` calls (autograd
    differentiates through both), z = (x − (x_[k] + x_[k+1]) / 2) / τ. Needs 1 <= k < N."""
    n = x.shape[-1]
    if not 1 <= k < n:
        raise ValueError(f"'k' should satisfy 1 <= k < N={n} but got {k}")
    hi = torch.kthvalue(x, n - k + 1, dim=-1).values  # x_[k] = (N−k+1)-th smallest
    lo = torch.kthvalue(x, n - k, dim=-1).values  # x_[k+1]
    return (x - 0.5 * (hi + lo).unsqueeze(-1)) / tau


def authors_dftopk(x: torch.Tensor, k: int, tau: float = 1.0) -> torch.Tensor:
    """σ of ``authors_dftopk_logits``: the authors' soft top-k membership."""
    return torch.sigmoid(authors_dftopk_logits(x, k, tau))


def elementwise_floor_loss(x: torch.Tensor, y: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """One BCE-with-logits pass over the scores: the elementwise floor of any top-k loss."""
    return F.binary_cross_entropy_with_logits(x / tau, y)


# ---- cost model --------------------------------------------------------------------------------


def complexity_exponent(complexity: str) -> float:
    """Exponent e of N in a registry complexity string ("O(N)", "O(N log N)", "O(N^2)", …)."""
    c = complexity.replace(" ", "").replace("²", "^2").replace("³", "^3")
    if "N^3" in c:
        return 3.0
    if "N^2" in c:
        return 2.0
    if "logN" in c:
        return 1.1
    return 1.0


def estimate_bytes(complexity: str, batch: int, n: int, itemsize: int = 4) -> int:
    """Rough bytes one forward+backward needs (see the module docstring for the factors)."""
    e = complexity_exponent(complexity)
    if e >= 3.0:
        return int(batch * n * n * itemsize * (n / 2 + 6))
    if e >= 2.0:
        return int(batch * n * n * itemsize * 6)
    return int(batch * n * itemsize * 8)


# ---- timing and memory -------------------------------------------------------------------------


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


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """Platform, CPU model (/proc/cpuinfo), cores, torch version, threads and device name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu,
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except ImportError:
        info["numba"] = None
    if dev.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


# ---- the measured lines ------------------------------------------------------------------------


@dataclass
class Line:
    """One measured line: ``forward(x, k, y)`` and ``loss(x, k, y)`` on (B, N) scores x with the
    (B, N) 0/1 label y (only the floor's forward reads y: its forward is its loss)."""

    name: str
    kind: str  # "reference" or "op"
    complexity: str
    forward: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)


def elementwise_floor_forward(tau: float) -> Callable[..., torch.Tensor]:
    """The floor line's forward: its loss on a prepared label (no allocation of its own)."""

    def forward(x: torch.Tensor, k: int, y: torch.Tensor) -> torch.Tensor:
        return elementwise_floor_loss(x, y, tau)

    return forward


def _bce_membership(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p, y)


def _op_line(name: str, **extra: Any) -> Line:
    from raytopk.ops import get_op, get_spec

    spec = get_spec(name)
    params = {spec.param: spec.default, **extra}
    if name == "dftopk":
        from raytopk.ops.dftopk import dftopk_logits

        tau = spec.default
        select = extra.get("select", "auto")
        label = name if not extra else f"dftopk[select={select}]"
        return Line(
            label,
            "op",
            spec.complexity,
            lambda x, k, y: dftopk_logits(x, k, tau, select=select),
            lambda x, k, y: F.binary_cross_entropy_with_logits(
                dftopk_logits(x, k, tau, select=select), y
            ),
            params,
        )
    fn = get_op(name)
    return Line(
        name,
        "op",
        spec.complexity,
        lambda x, k, y: fn(x, k, **params),
        lambda x, k, y: _bce_membership(fn(x, k, **params), y),
        params,
    )


def build_lines(
    ops: Iterable[str] | None = None,
    *,
    select_compare: bool = False,
    device: torch.device | str = "cpu",
) -> list[Line]:
    """The reference lines, then every requested registered operator (default: ``list_ops()``),
    then with ``select_compare`` DFTopK once per selection primitive available on ``device``."""
    from raytopk.ops import get_spec, list_ops

    tau = get_spec("dftopk").default if "dftopk" in list_ops() else 1.0
    lines = [
        Line(
            "authors_dftopk",
            "reference",
            "O(N)",
            lambda x, k, y: authors_dftopk_logits(x, k, tau),
            lambda x, k, y: F.binary_cross_entropy_with_logits(authors_dftopk_logits(x, k, tau), y),
            {"tau": tau},
        ),
        Line(
            "elementwise_floor",
            "reference",
            "O(N)",
            elementwise_floor_forward(tau),
            lambda x, k, y: elementwise_floor_loss(x, y, tau),
            {"tau": tau},
        ),
    ]
    names = list_ops() if ops is None else list(ops)
    for name in names:
        lines.append(_op_line(name))
    if select_compare:
        selects = ["topk", "kthvalue"]
        if torch.device(device).type == "cpu":
            selects.insert(0, "numba")
        for s in selects:
            lines.append(_op_line("dftopk", select=s))
    return lines


def operator_configs(
    batches: Sequence[int], sizes: Sequence[int], ks: Sequence[str], extra: Sequence[tuple] = ()
) -> list[tuple[int, int, int, str]]:
    """(B, N, k, k_rule) for B × N × k-rule, k clipped to N − 1, duplicates dropped, plus
    ``extra`` (B, N, k) shapes (rule "fixed"); ordered by B·N so extrapolation sees small first.

    k rules: an integer string ("10") or "N//2".
    """
    out: dict[tuple[int, int, int], str] = {}
    for b in batches:
        for n in sizes:
            if n < 2:
                raise ValueError(f"'sizes' should be >= 2 but got {n}")
            for rule in ks:
                k = n // 2 if rule == "N//2" else int(rule)
                k = max(1, min(k, n - 1))
                out.setdefault((b, n, k), rule)
    for b, n, k in extra:
        out.setdefault((b, n, max(1, min(k, n - 1))), "fixed")
    return sorted(((b, n, k, r) for (b, n, k), r in out.items()), key=lambda c: (c[0] * c[1], c))


def _inputs(
    batch: int, n: int, k: int, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, n, generator=g, device=device, dtype=dtype)
    priority = torch.randn(batch, n, generator=g, device=device, dtype=dtype)
    y = torch.zeros_like(x).scatter_(-1, priority.topk(k, dim=-1).indices, 1.0)
    return x.requires_grad_(True), y


def _callables(line: Line, x: torch.Tensor, k: int, y: torch.Tensor) -> dict[str, Callable]:
    def forward() -> None:
        line.forward(x, k, y)

    def forward_backward() -> None:
        line.loss(x, k, y).backward()
        x.grad = None  # the zero_grad of a training step; also frees the gradient

    return {"forward": forward, "forward_backward": forward_backward}


# Per-call fixed cost (Python dispatch of a few ops) that does not grow with B·N^e; left
# in, a 0.5 ms call at N=10 would extrapolate to seconds at N=200 for an O(N²) op.
_OVERHEAD_S = 2.5e-4


def _estimate_seconds(
    history: list[tuple[int, int, float]], batch: int, n: int, exponent: float
) -> float | None:
    """Extrapolate from the largest measured (B, N) whose work B·N^e is below this one's: the
    fastest call there minus a fixed overhead, scaled by the work ratio, plus the overhead."""
    work = batch * n**exponent
    below = [(b * m**exponent, t) for b, m, t in history if b * m**exponent <= work]
    if not below:
        return None
    w, t = max(below)
    return _OVERHEAD_S + max(t - _OVERHEAD_S, 0.0) * work / w


def bench_operators(
    lines: Sequence[Line],
    configs: Sequence[tuple[int, int, int, str]],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 2.0,
    time_budget_s: float = 10.0,
    mem_budget_gb: float = 4.0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every line at every (B, N, k) config in both modes; one record per measurement.

    Record keys: line, kind, B, N, k, k_rule, mode, status ("ok" | "skipped"), and median_ms,
    mean_ms, min_ms, repeats (ok) or reason ("memory" | "time"), needed_bytes / estimated_s
    (skipped); scores_bytes always.
    """
    dev = torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = int(mem_budget_gb * 2**30)
    history: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
    records: list[dict[str, Any]] = []
    for batch, n, k, rule in configs:
        x, y = _inputs(batch, n, k, dev, dtype, seed)
        for line in lines:
            exponent = complexity_exponent(line.complexity)
            needed = estimate_bytes(line.complexity, batch, n, itemsize)
            calls = _callables(line, x, k, y)
            for mode in ("forward", "forward_backward"):
                rec: dict[str, Any] = {
                    "line": line.name,
                    "kind": line.kind,
                    "B": batch,
                    "N": n,
                    "k": k,
                    "k_rule": rule,
                    "mode": mode,
                    "scores_bytes": batch * n * itemsize,
                }
                hist = history.setdefault((line.name, mode), [])
                est = _estimate_seconds(hist, batch, n, exponent)
                if needed > budget:
                    rec.update(status="skipped", reason="memory", needed_bytes=needed)
                elif est is not None and est > time_budget_s:
                    rec.update(status="skipped", reason="time", estimated_s=round(est, 3))
                else:
                    t = time_fn(
                        calls[mode], dev, warmup=warmup, repeats=repeats, max_seconds=max_seconds
                    )
                    hist.append((batch, n, t["min_s"]))  # min: robust to preemption
                    rec.update(
                        status="ok",
                        median_ms=t["median_s"] * 1e3,
                        mean_ms=t["mean_s"] * 1e3,
                        min_ms=t["min_s"] * 1e3,
                        repeats=t["repeats"],
                    )
                records.append(rec)
                if log is not None:
                    log(_describe(rec))
        del x, y
    return records


def measure_memory(
    lines: Sequence[Line],
    records: list[dict[str, Any]],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> None:
    """Add peak_bytes, peak_method and peak_over_scores to every ok forward_backward record (one
    call each; run after all timings — on CPU it changes glibc's allocation policy)."""
    dev = torch.device(device)
    by_name = {line.name: line for line in lines}
    for rec in records:
        if rec["status"] != "ok" or rec["mode"] != "forward_backward":
            continue
        x, y = _inputs(rec["B"], rec["N"], rec["k"], dev, dtype, seed)
        call = _callables(by_name[rec["line"]], x, rec["k"], y)["forward_backward"]
        call()  # allocator warm-up (CUDA caching allocator, numba thread pool)
        peak = peak_memory(call, dev)
        rec.update(
            peak_bytes=peak["bytes"],
            peak_method=peak["method"],
            peak_over_scores=peak["bytes"] / rec["scores_bytes"],
        )
        del x, y


def _describe(rec: dict[str, Any]) -> str:
    head = f"{rec['line']:>24} B={rec['B']:<5} N={rec['N']:<6} k={rec['k']:<5} {rec['mode']:<16}"
    if rec["status"] == "ok":
        return f"{head} {rec['median_ms']:10.3f} ms ({rec['repeats']} reps)"
    if rec["reason"] == "memory":
        return f"{head} skipped: needs {rec['needed_bytes'] / 2**30:.1f} GiB"
    return f"{head} skipped: ~{rec['estimated_s']:.1f} s per call"


def fmt_bytes(b: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def _cell(rec: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    if rec is None:
        return ""
    if rec["status"] != "ok":
        if rec["reason"] == "memory":
            return f"skip (needs {fmt_bytes(rec['needed_bytes'])})"
        return f"skip (~{rec['estimated_s']:.0f} s)"
    cell = f"{rec['median_ms']:.3g} ms"
    if ref is not None and ref["status"] == "ok" and rec is not ref:
        cell += f" ({ref['median_ms'] / rec['median_ms']:.2f}×)"
    return cell


def markdown_operator_tables(records: Sequence[dict[str, Any]]) -> str:
    """One markdown table per mode: rows (B, N, k), one column per line, cells 'median ms
    (speed-up ×)' where speed-up = authors' formulation time / this time in the same run
    (> 1 = faster than the authors' formulation); then a peak-memory table if measured."""
    lines = list(dict.fromkeys(r["line"] for r in records))
    shapes = list(dict.fromkeys((r["B"], r["N"], r["k"]) for r in records))
    by = {(r["line"], r["B"], r["N"], r["k"], r["mode"]): r for r in records}
    out = []
    for mode in ("forward", "forward_backward"):
        out.append(f"\n**{mode}** (median; × = authors_dftopk time / this time)\n")
        out.append("| B | N | k | " + " | ".join(lines) + " |")
        out.append("|" + "---|" * (3 + len(lines)))
        for b, n, k in shapes:
            ref = by.get(("authors_dftopk", b, n, k, mode))
            cells = [_cell(by.get((line, b, n, k, mode)), ref) for line in lines]
            out.append(f"| {b} | {n} | {k} | " + " | ".join(cells) + " |")
    if any("peak_bytes" in r for r in records):
        method = next(r["peak_method"] for r in records if "peak_method" in r)
        out.append(
            f"\n**peak extra memory, forward_backward** ({method}; "
            "× = peak / bytes of the scores tensor)\n"
        )
        out.append("| B | N | k | " + " | ".join(lines) + " |")
        out.append("|" + "---|" * (3 + len(lines)))
        for b, n, k in shapes:
            cells = []
            for line in lines:
                r = by.get((line, b, n, k, "forward_backward"))
                if r is None or r["status"] != "ok":
                    cells.append("" if r is None else _cell(r, None))
                elif "peak_bytes" in r:
                    cells.append(f"{fmt_bytes(r['peak_bytes'])} ({r['peak_over_scores']:.1f}×)")
                else:
                    cells.append("")
            out.append(f"| {b} | {n} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---- interleaved headline comparison -----------------------------------------------------------

HEADLINE_SHAPES = (
    (1, 200, 10),
    (1024, 40, 10),
    (1024, 200, 10),
    (1024, 200, 100),
    (1024, 1000, 500),
    (64, 100_000, 100),
    (16, 100_000, 50_000),
)


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device | str, rounds: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each fn, measured in rounds that call every fn once, in a
    rotating order: on a shared machine a burst of load hits every line alike, so the ratios
    between lines stay meaningful even when the absolute times drift."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def headline(
    device: torch.device | str = "cpu",
    shapes: Sequence[tuple[int, int, int]] = HEADLINE_SHAPES,
    max_seconds: float = 6.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """DFTopK against the authors' formulation, a full sort and the elementwise floor, forward
    and forward+backward (BCE-with-logits against a top-k label), interleaved per shape."""
    from raytopk.ops.dftopk import dftopk_logits

    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for b, n, k in shapes:
        x0 = torch.randn(b, n, generator=g).to(device)
        y = (torch.rand(b, n, generator=g) < k / n).float().to(device)

        def sort_logits(x: torch.Tensor, k: int = k) -> torch.Tensor:
            s = torch.sort(x, dim=-1, descending=True).values
            return x - 0.5 * (s[..., k - 1] + s[..., k]).unsqueeze(-1)

        lines = {
            "dftopk": lambda x, k=k: dftopk_logits(x, k),
            "authors_dftopk": lambda x, k=k: authors_dftopk_logits(x, k),
            "full_sort": sort_logits,
            "elementwise_floor": lambda x: x * 1.0,
        }
        for mode in ("forward", "forward_backward"):
            fns: dict[str, Callable[[], object]] = {}
            for name, f in lines.items():
                if mode == "forward":

                    def call(f=f, x0=x0) -> object:
                        with torch.no_grad():
                            return f(x0)
                else:
                    xg = x0.clone().requires_grad_()

                    def call(f=f, xg=xg, y=y) -> object:
                        xg.grad = None
                        F.binary_cross_entropy_with_logits(f(xg), y).backward()
                        return xg.grad

                fns[name] = call
            t0 = time.perf_counter()
            for f in fns.values():
                f()
            once = time.perf_counter() - t0
            rounds = int(max(5, min(200, max_seconds / max(once, 1e-6))))
            med = interleaved(fns, device, rounds)
            rec = {
                "B": b,
                "N": n,
                "k": k,
                "mode": mode,
                "rounds": rounds,
                "ms": {name: round(s * 1e3, 4) for name, s in med.items()},
            }
            rec["speedup_vs_authors"] = round(med["authors_dftopk"] / med["dftopk"], 2)
            rec["speedup_vs_sort"] = round(med["full_sort"] / med["dftopk"], 2)
            rec["over_floor"] = round(med["dftopk"] / med["elementwise_floor"], 2)
            out.append(rec)
    return out


def markdown_headline(recs: Sequence[dict[str, Any]]) -> str:
    rows = [
        "| B | N | k | mode | dftopk | authors (2× kthvalue) | full sort | elementwise floor "
        "| dftopk speed-up vs authors | vs sort |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in recs:
        ms = r["ms"]
        rows.append(
            f"| {r['B']} | {r['N']} | {r['k']} | {r['mode']} | {ms['dftopk']:.3f} ms "
            f"| {ms['authors_dftopk']:.3f} ms | {ms['full_sort']:.3f} ms "
            f"| {ms['elementwise_floor']:.3f} ms | {r['speedup_vs_authors']:.2f}× "
            f"| {r['speedup_vs_sort']:.2f}× |"
        )
    return "\n".join(rows)
