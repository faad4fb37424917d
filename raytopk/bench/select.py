"""DFTopK's selection primitive by measurement (docs/protocol.md §2.1): every ``select`` of
``raytopk.ops.dftopk`` on one device, against the authors' two-kthvalue formulation and the
elementwise floor, interleaved per shape; the fastest becomes ``_AUTO_SELECT[device]``.

Notation: B = rows, N = scores per row, k = selected per row.

Lines (all on the same (B, N) standard-normal scores, k the same in every row):
- ``dftopk[select=s]`` for s in ``TORCH_SELECTS`` (and ``numba`` on CPU): ``dftopk_logits``;
- ``authors_dftopk``: two ``torch.kthvalue`` calls, autograd through both
  (``raytopk.bench.reference``);
- ``elementwise_floor``: BCE-with-logits of x / τ, the cost no top-k loss goes below.

Modes: ``forward`` (no grad) and ``forward_backward`` (BCE-with-logits against a random label,
backward to the scores). Timing: ``raytopk.bench.harness.interleaved`` (device-synchronised,
shuffled order, median), so the lines of one shape share whatever load the machine has.

``recommend`` picks the select with the lowest geometric mean of forward+backward time over the
shapes; ties within 3% go to the earlier entry of ``TORCH_SELECTS`` (``topk`` first: it is the
only one that handles per-row k without a fallback). ``compare_selects`` also reports the pick
over the training shapes alone (B = 1024, k = 10) as ``training_shapes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from raytopk.bench.harness import calibrated_interleaved, timing_record
from raytopk.bench.op_sweeps import HEADLINE_SHAPES
from raytopk.bench.reference import authors_dftopk_logits, elementwise_floor_loss
from raytopk.ops.dftopk import DEFAULT_TAU, TORCH_SELECTS, dftopk_logits

__all__ = ["SELECT_SHAPES", "device_selects", "compare_selects", "recommend"]

SELECT_SHAPES = HEADLINE_SHAPES  # the benchmark's shapes: the training shapes and long rows
_TIE = 1.03


def device_selects(device: torch.device | str) -> list[str]:
    """The selection primitives that run on ``device`` (numba on CPU only)."""
    cpu = torch.device(device).type == "cpu"
    return (["numba"] if cpu else []) + list(TORCH_SELECTS)


def _lines(device: torch.device | str, tau: float) -> dict[str, Callable[..., torch.Tensor]]:
    lines: dict[str, Callable[..., torch.Tensor]] = {
        f"dftopk[select={s}]": (lambda x, k, s=s: dftopk_logits(x, k, tau, select=s))
        for s in device_selects(device)
    }
    lines["authors_dftopk"] = lambda x, k: authors_dftopk_logits(x, k, tau)
    return lines


def _calls(
    lines: dict[str, Callable[..., torch.Tensor]],
    x0: torch.Tensor,
    y: torch.Tensor,
    k: int,
    tau: float,
    mode: str,
) -> dict[str, Callable[[], object]]:
    """One no-argument call per line (and the floor) for ``mode``, on its own copy of x0."""
    grad = mode == "forward_backward"
    fns: dict[str, Callable[[], object]] = {}
    for name, f in lines.items():
        x = x0.clone().requires_grad_(grad)

        def call(f=f, x=x) -> object:
            if not grad:
                with torch.no_grad():
                    return f(x, k)
            x.grad = None
            F.binary_cross_entropy_with_logits(f(x, k), y).backward()
            return x.grad

        fns[name] = call
    xf = x0.clone().requires_grad_(grad)

    def floor() -> object:
        loss = elementwise_floor_loss(xf, y, tau)
        if grad:
            xf.grad = None
            loss.backward()
        return loss

    fns["elementwise_floor"] = floor
    return fns


def compare_selects(
    device: torch.device | str = "cpu",
    shapes: Sequence[tuple[int, int, int]] = SELECT_SHAPES,
    *,
    max_seconds: float = 1.5,
    max_rounds: int = 200,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median ms of every line per shape and mode, and the recommendation (see module doc).

    ``max_seconds``: rough time per (shape, mode); ``max_rounds`` caps the rounds."""
    dev = torch.device(device)
    tau = DEFAULT_TAU
    g = torch.Generator().manual_seed(seed)
    records = []
    for b, n, k in shapes:
        x0 = (torch.randn(b, n, generator=g) * tau).to(dev)  # scores on τ's scale
        y = (torch.rand(b, n, generator=g) < k / n).float().to(dev)
        lines = _lines(dev, tau)
        for mode in ("forward", "forward_backward"):
            fns = _calls(lines, x0, y, k, tau, mode)
            med, rounds = calibrated_interleaved(
                fns, dev, max_seconds, min_rounds=3, max_rounds=max_rounds, warmup=1
            )
            rec = timing_record(b, n, k, mode, med, rounds)
            best = min((s for s in med if s.startswith("dftopk")), key=med.__getitem__)
            rec["fastest"] = best
            rec["fastest_vs_authors"] = round(med["authors_dftopk"] / med[best], 2)
            rec["fastest_over_floor"] = round(med[best] / med["elementwise_floor"], 2)
            records.append(rec)
            if log is not None:
                log(
                    f"select B={b} N={n} k={k} {mode}: "
                    + ", ".join(f"{name} {ms:.3f}" for name, ms in rec["ms"].items())
                    + " ms"
                )
    out = {"device": str(dev), "records": records, **recommend(records, device_selects(dev))}
    # The shapes training runs at (docs/protocol.md §4.4–4.5: batch 1024, k = 10), as a second
    # opinion.
    train = [r for r in records if (r["B"], r["k"]) == (1024, 10)]
    if any(r["mode"] == "forward_backward" for r in train):
        out["training_shapes"] = recommend(train, device_selects(dev))
    return out


def recommend(records: Sequence[dict[str, Any]], selects: Sequence[str]) -> dict[str, Any]:
    """{"recommended": select, "geomean_ms": {select: ms}} over the forward_backward records."""
    fb = [r for r in records if r["mode"] == "forward_backward"]
    if not fb:
        raise ValueError("recommend: no forward_backward records")
    geo = {
        s: math.exp(sum(math.log(max(r["ms"][f"dftopk[select={s}]"], 1e-9)) for r in fb) / len(fb))
        for s in selects
    }
    best = min(geo.values())
    choice = next(s for s in selects if geo[s] <= best * _TIE)
    return {"recommended": choice, "geomean_ms": {s: round(v, 4) for s, v in geo.items()}}
