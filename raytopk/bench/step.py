"""Step-level runtime protocol of the DFTopK paper (Zhu et al., arXiv 2510.11472, "count time"),
docs/protocol.md §5.1, re-implemented so that every operator is measured side by side in one run.

Notation: n = candidates scored per request, k = n // 2, batch of 1 request.

One training step = input generation (a random user vector, n random item vectors, a random
priority whose top-k is the label) + forward of a small two-tower DSSM-like toy model
(``ToyDSSM``: two MLPs 16 → 128 → 64 → 32, score = dot product) + the single-stage loss with the
operator + backward + zero_grad (no optimiser step, as in the protocol). 10 warm-up steps, then
the mean of 90 timed steps (``torch.cuda.synchronize`` around each on CUDA), for
n ∈ {5, 10, 50, 100, 500, 1000}.

Single-stage loss per line:
- ``dftopk``: BCE-with-logits(dftopk_logits(s, k, τ), y);
- ``authors_dftopk`` (reference): BCE-with-logits on the authors' two-``kthvalue`` logits;
- other non-permutation ops (lapsum, sparse_topk): BCE(membership, y), membership in [0, 1];
- permutation ops (neuralsort, softsort, diffsort): the LCRON single-stage term L_s of
  docs/protocol.md §3.3 (``raytopk.losses.lcron.lcron_single_stage_loss``) between the model's soft
  permutation of s and the label relaxation of the priority (τ_label / β_label: the registry's
  ``label_param``, computed without gradient inside the step, as the label of the authors' LCRON
  script is), which is the loss the authors time for "LCRON + <sort>"; if raytopk.losses cannot
  be imported, BCE on the membership instead (the record's ``loss`` field says which was used).
Operator parameters are the registry's RecFlow-protocol defaults.

Time caps (a full run must stay short): warm-up stops after 0.2·``max_seconds`` (at least one
step), timing after ``max_seconds`` (the record keeps the number of steps actually timed), and a
line whose step time, extrapolated from its previous n with the registry's complexity exponent
(only the part above the fastest line's step time at that n is scaled), exceeds
``time_budget_s`` is recorded as skipped with the estimate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raytopk.bench.cost import complexity_exponent
from raytopk.bench.harness import sync
from raytopk.bench.reference import authors_dftopk_logits

__all__ = [
    "ToyDSSM",
    "STEP_SIZES",
    "ANCHOR_MS",
    "make_step",
    "bench_steps",
    "markdown_step_table",
]

STEP_SIZES = (5, 10, 50, 100, 500, 1000)

# The authors' own code under this protocol on a 2-core CPU machine, torch 2.13 (docs/protocol.md
# §5.1), ms per step.
ANCHOR_MS: dict[str, dict[int, float | None]] = {
    "dftopk": {10: 3.50, 100: 4.04, 1000: 5.88},
    "sparse_topk": {10: 283.8, 100: 268.1, 1000: 273.9},
    "lapsum": {10: 3.97, 100: 4.98, 1000: 7.30},
    "softsort": {10: 3.69, 100: 4.28, 1000: 21.60},
    "neuralsort": {10: 4.26, 100: 4.82, 1000: 76.95},
    "diffsort": {10: 10.48, 100: 172.79, 1000: None},  # None: > 10 minutes
}


class ToyDSSM(nn.Module):
    """Two-tower toy scorer: user (B, d) and items (B, n, d) → scores (B, n) = ⟨u, v⟩."""

    def __init__(self, dim: int = 16, hidden: Sequence[int] = (128, 64, 32)) -> None:
        super().__init__()
        self.dim = dim
        self.user_tower = _mlp(dim, hidden)
        self.item_tower = _mlp(dim, hidden)

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self.user_tower(user)  # (B, h)
        v = self.item_tower(items)  # (B, n, h)
        return torch.einsum("bh,bnh->bn", u, v)


def _mlp(dim: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(dim, h), nn.ReLU()]
        dim = h
    return nn.Sequential(*layers[:-1])  # no activation on the output embedding


def _loss_fn(
    line: str,
) -> tuple[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], str, str]:
    """(loss(scores, priority, k), loss name, complexity) of one line."""
    from raytopk.ops import get_op, get_spec

    def label(priority: torch.Tensor, k: int) -> torch.Tensor:
        return torch.zeros_like(priority).scatter_(-1, priority.topk(k, dim=-1).indices, 1.0)

    if line == "authors_dftopk":
        tau = get_spec("dftopk").default

        def authors(s: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(authors_dftopk_logits(s, k, tau), label(p, k))

        return authors, "bce_with_logits", "O(N)"
    spec = get_spec(line)
    value = spec.default
    if line == "dftopk":
        from raytopk.ops.dftopk import dftopk_logits

        def dft(s: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(dftopk_logits(s, k, value), label(p, k))

        return dft, "bce_with_logits", spec.complexity
    if spec.permutation:
        try:
            from raytopk.losses.lcron import (
                label_param_of,
                lcron_single_stage_loss,
                soft_permutation_fn,
            )

            soft_perm = soft_permutation_fn(line)
            label_value = label_param_of(line)

            def lcron(s: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
                with torch.no_grad():
                    labels_perm = soft_perm(p, label_value)
                return lcron_single_stage_loss(soft_perm(s, value), labels_perm, k)

            return lcron, "lcron_single_stage", spec.complexity
        except (ImportError, KeyError, ValueError):
            pass  # fall through to BCE on the membership
    fn = get_op(line)

    def bce(s: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
        return F.binary_cross_entropy(fn(s, k, **{spec.param: value}), label(p, k))

    return bce, "bce_membership", spec.complexity


def make_step(
    line: str, n: int, model: ToyDSSM, device: torch.device | str
) -> tuple[Callable[[], None], str, str]:
    """(step(), loss name, complexity): one protocol step of ``line`` with n candidates."""
    dev = torch.device(device)
    loss_fn, loss_name, complexity = _loss_fn(line)
    k = max(1, n // 2)

    def step() -> None:
        user = torch.randn(1, model.dim, device=dev)  # input generation is part of the step
        items = torch.randn(1, n, model.dim, device=dev)
        priority = torch.randn(1, n, device=dev)
        loss = loss_fn(model(user, items), priority, k)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step, loss_name, complexity


def bench_steps(
    lines: Iterable[str],
    sizes: Sequence[int] = STEP_SIZES,
    *,
    device: torch.device | str = "cpu",
    warmup: int = 10,
    steps: int = 90,
    max_seconds: float = 10.0,
    time_budget_s: float = 5.0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One record per (line, n): line, n, k, loss, status, mean_ms, median_ms, steps, warmup,
    anchor_ms (the authors' figure where ANCHOR_MS has one) or reason/estimated_s if skipped."""
    dev = torch.device(device)
    records: list[dict[str, Any]] = []
    for line in lines:
        torch.manual_seed(seed)
        model = ToyDSSM().to(dev)
        prev: tuple[int, float] | None = None
        for n in sorted(sizes):
            step, loss_name, complexity = make_step(line, n, model, dev)
            rec: dict[str, Any] = {"line": line, "n": n, "k": max(1, n // 2), "loss": loss_name}
            anchor = ANCHOR_MS.get(line, {})
            if n in anchor:
                rec["anchor_ms"] = anchor[n]
            if prev is not None:
                # The model, input generation and BCE are a per-step constant: the fastest line
                # measured at the previous n (the first line has none) is not scaled.
                base = min(
                    (r["mean_ms"] / 1e3 for r in records if r["n"] == prev[0] and "mean_ms" in r),
                    default=0.0,
                )
                base = min(base, prev[1])
                ratio = (n / prev[0]) ** complexity_exponent(complexity)
                est = base + (prev[1] - base) * ratio
                if est > time_budget_s:
                    rec.update(status="skipped", reason="time", estimated_s=round(est, 3))
                    records.append(rec)
                    if log is not None:
                        log(f"{line:>16} n={n:<5} skipped: ~{est:.1f} s per step")
                    continue
            done_warmup = 0
            t_start = time.perf_counter()
            while done_warmup < warmup:
                step()
                done_warmup += 1
                if time.perf_counter() - t_start > 0.2 * max_seconds:
                    break
            sync(dev)
            times: list[float] = []
            spent = 0.0
            while len(times) < steps and spent <= max_seconds:
                t0 = time.perf_counter()
                step()
                sync(dev)
                times.append(time.perf_counter() - t0)
                spent += times[-1]
            mean = statistics.fmean(times)
            prev = (n, mean)
            rec.update(
                status="ok",
                mean_ms=mean * 1e3,
                median_ms=statistics.median(times) * 1e3,
                steps=len(times),
                warmup=done_warmup,
            )
            records.append(rec)
            if log is not None:
                log(f"{line:>16} n={n:<5} {rec['mean_ms']:9.3f} ms mean of {len(times)} steps")
    return records


def markdown_step_table(records: Sequence[dict[str, Any]]) -> str:
    """Rows = lines, columns = n; cells 'mean ms' (the authors' own figure from ANCHOR_MS in
    brackets where there is one; their code on a 2-core CPU, a different run)."""
    sizes = sorted({r["n"] for r in records})
    lines = list(dict.fromkeys(r["line"] for r in records))
    by = {(r["line"], r["n"]): r for r in records}
    head = "| line (loss) | " + " | ".join(f"n={n}" for n in sizes) + " |"
    rows = [head, "|" + "---|" * (len(sizes) + 1)]
    for line in lines:
        loss = next(r["loss"] for r in records if r["line"] == line)
        cells = []
        for n in sizes:
            r = by.get((line, n))
            if r is None:
                cells.append("")
                continue
            if r["status"] == "ok":
                cell = f"{r['mean_ms']:.2f} ms"
                if r["steps"] < 90:
                    cell += f" ({r['steps']} steps)"
            else:
                cell = f"skip (~{r['estimated_s']:.0f} s/step)"
            if "anchor_ms" in r:
                a = r["anchor_ms"]
                cell += " [authors: >10 min]" if a is None else f" [authors: {a} ms]"
            cells.append(cell)
        rows.append(f"| {line} ({loss}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)
