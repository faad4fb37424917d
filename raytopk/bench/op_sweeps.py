"""Operator-level sweeps of the differentiable top-k operators (docs/protocol.md §5.2: the sweeps
the DFTopK paper, Zhu et al. arXiv 2510.11472, lacks), and the interleaved
headline comparison of DFTopK against its references.

Notation: B = rows (requests), N = scores per row, k = selected per row, τ = DFTopK temperature,
x_[1] ≥ … ≥ x_[N] a row's order statistics.

Lines measured side by side in one run, on one (B, N) float tensor of standard-normal scores:

- every registered operator (``list_ops()``), at its RecFlow-protocol parameter (registry
  ``default``); DFTopK through ``dftopk_logits`` (what its BCE-with-logits loss uses);
- ``authors_dftopk``, the authors' formulation of DFTopK as a reference
  (``raytopk.bench.reference``): two k-th-order-statistic calls, autograd through both;
- ``elementwise_floor``: one BCE-with-logits pass over the same tensor (x / τ against the label),
  the cost no top-k loss can go below.

Modes: ``forward`` = the operator's output only (gradients enabled, as in training; the floor's
forward is its loss); ``forward_backward`` = output, BCE against a hard top-k label (of an
independent random priority), backward to the scores. BCE-with-logits for the logit lines
(dftopk, authors_dftopk, floor), BCE on the membership for the others. Timing and peak memory:
``raytopk.bench.harness``.

Skips, recorded instead of run:
- memory: the operator's own estimate from its registry entry,
  ``get_spec(name).step_bytes(B, N, itemsize)`` (the reference lines, formulations of DFTopK,
  use DFTopK's), above ``mem_budget_gb`` → ``needed_bytes``;
- time: a line's time extrapolated from its largest smaller measured shape (fastest call minus
  0.25 ms of fixed overhead, scaled linearly in B·N^e with e from the registry's complexity, plus
  the overhead; ``raytopk.bench.cost``) above ``time_budget_s`` → ``estimated_s``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from raytopk.bench.cost import complexity_exponent, estimate_seconds
from raytopk.bench.harness import calibrated_interleaved, peak_memory, time_fn, timing_record
from raytopk.bench.reference import (
    authors_dftopk_logits,
    elementwise_floor_loss,
    full_sort_logits,
)
from raytopk.ops import get_op, get_spec, list_ops
from raytopk.ops.dftopk import DEFAULT_TAU, TORCH_SELECTS, dftopk_logits

__all__ = [
    "Line",
    "HEADLINE_SHAPES",
    "build_lines",
    "operator_configs",
    "bench_operators",
    "measure_memory",
    "headline",
]


@dataclass
class Line:
    """One measured line: ``forward(x, k, y)`` and ``loss(x, k, y)`` on (B, N) scores x with the
    (B, N) 0/1 label y (only the floor's forward reads y: its forward is its loss);
    ``step_bytes(B, N, itemsize)`` the registry's memory estimate of its operator."""

    name: str
    kind: str  # "reference" or "op"
    complexity: str
    forward: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
    step_bytes: Callable[..., int]
    params: dict[str, Any] = field(default_factory=dict)


def elementwise_floor_forward(tau: float) -> Callable[..., torch.Tensor]:
    """The floor line's forward: its loss on a prepared label (no allocation of its own)."""

    def forward(x: torch.Tensor, k: int, y: torch.Tensor) -> torch.Tensor:
        return elementwise_floor_loss(x, y, tau)

    return forward


def _bce_membership(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p, y)


def _op_line(name: str, **extra: Any) -> Line:
    spec = get_spec(name)
    params = {spec.param: spec.default, **extra}
    if name == "dftopk":
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
            step_bytes=spec.step_bytes,
            params=params,
        )
    fn = get_op(name)
    return Line(
        name,
        "op",
        spec.complexity,
        lambda x, k, y: fn(x, k, **params),
        lambda x, k, y: _bce_membership(fn(x, k, **params), y),
        step_bytes=spec.step_bytes,
        params=params,
    )


def build_lines(
    ops: Iterable[str] | None = None,
    *,
    select_compare: bool = False,
    device: torch.device | str = "cpu",
) -> list[Line]:
    """The reference lines, then every requested registered operator (default: ``list_ops()``),
    then with ``select_compare`` DFTopK once per selection primitive available on ``device``."""
    tau = DEFAULT_TAU
    # The references are formulations of DFTopK (O(N) memory): they use its estimate.
    dftopk_bytes = get_spec("dftopk").step_bytes
    lines = [
        Line(
            "authors_dftopk",
            "reference",
            "O(N)",
            lambda x, k, y: authors_dftopk_logits(x, k, tau),
            lambda x, k, y: F.binary_cross_entropy_with_logits(authors_dftopk_logits(x, k, tau), y),
            step_bytes=dftopk_bytes,
            params={"tau": tau},
        ),
        Line(
            "elementwise_floor",
            "reference",
            "O(N)",
            elementwise_floor_forward(tau),
            lambda x, k, y: elementwise_floor_loss(x, y, tau),
            step_bytes=dftopk_bytes,
            params={"tau": tau},
        ),
    ]
    names = list_ops() if ops is None else list(ops)
    for name in names:
        lines.append(_op_line(name))
    if select_compare:
        selects = list(TORCH_SELECTS)
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
            needed = line.step_bytes(batch, n, itemsize)
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
                est = estimate_seconds(hist, batch, n, exponent)
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


def headline(
    device: torch.device | str = "cpu",
    shapes: Sequence[tuple[int, int, int]] = HEADLINE_SHAPES,
    max_seconds: float = 6.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """DFTopK against the authors' formulation, a full sort and the elementwise floor, forward
    and forward+backward (BCE-with-logits against a top-k label), interleaved per shape."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for b, n, k in shapes:
        x0 = torch.randn(b, n, generator=g).to(device)
        y = (torch.rand(b, n, generator=g) < k / n).float().to(device)

        lines = {
            "dftopk": lambda x, k=k: dftopk_logits(x, k),
            "authors_dftopk": lambda x, k=k: authors_dftopk_logits(x, k),
            "full_sort": lambda x, k=k: full_sort_logits(x, k),
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
            med, rounds = calibrated_interleaved(
                fns, device, max_seconds, min_rounds=5, max_rounds=200
            )
            rec = timing_record(b, n, k, mode, med, rounds)
            rec["speedup_vs_authors"] = round(med["authors_dftopk"] / med["dftopk"], 2)
            rec["speedup_vs_sort"] = round(med["full_sort"] / med["dftopk"], 2)
            rec["over_floor"] = round(med["dftopk"] / med["elementwise_floor"], 2)
            out.append(rec)
    return out
