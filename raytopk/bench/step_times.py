"""What one training step costs, measured side by side (jobs/bench_step.py): DIN's attention with
the fused kernel against the plain path, a whole step with each, and the step-time table the
study matches compute with (every method at N ∈ {40, 200, 1000}, with the operator + loss share).

Notation: B = requests per batch, N = 40 + sample_num candidates per request, L = behaviour
slots (50), H = DIN's attention width (80). "fused" / "reference" are the two attention paths of
raytopk.models.attention ("reference" = today's plain path, candidate-chunked with gradient
checkpointing as PrerankDIN runs it).

A step is what the training loop does per batch: forward of every stage, the joint loss,
backward, Adam. The operator + loss time is the loss module's forward and backward on the
stages' scores (detached, so the models are not in it), timed in the same interleaved rounds as
the step; its share = its median / the step's median.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from raytopk.bench.harness import calibrated_interleaved, interleaved_times, peak_memory

__all__ = ["attention_records", "compare_tables", "make_train_step", "step_records", "spread",
           "STAGES"]

STAGES = 2  # retrieval + pre-rank: the operator runs once per stage


def spread(ts: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of per-round seconds, in seconds."""
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {
        "median_s": statistics.median(ts),
        "q25_s": q[0],
        "q75_s": q[2],
        "min_s": min(ts),
        "max_s": max(ts),
        "rounds": len(ts),
    }


def _din_pair(vocab: dict[str, int]) -> dict[str, Any]:
    from raytopk.models import PrerankDIN

    out = {}
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        out[impl] = PrerankDIN(vocab, attention=impl)
    return out


def attention_records(
    vocab: dict[str, int], shapes: Sequence[tuple[int, int]], max_seconds: float, max_rounds: int
) -> list[dict[str, Any]]:
    """DIN's interest (attention score, masked softmax, weighted sum) at each (B, N), both paths:
    forward+backward and forward alone (no autograd, as evaluation runs it), interleaved, then
    the extra peak memory of one call of each."""
    from raytopk.data import schema

    dins = _din_pair(vocab)
    e = dins["fused"].e_dim
    recs = []
    for b, n in shapes:
        g = torch.Generator().manual_seed(b + n)
        seq = torch.randn(b, schema.SEQ_LEN, e, generator=g, requires_grad=True)
        cand = torch.randn(b, n, e, generator=g, requires_grad=True)
        mask = torch.rand(b, schema.SEQ_LEN, generator=g) > 0.1
        gout = torch.randn(b, n, e, generator=g)

        def fb(m, seq=seq, mask=mask, cand=cand, gout=gout):
            m.interest(seq, mask, cand).backward(gout)

        def fw(m, seq=seq, mask=mask, cand=cand):
            with torch.no_grad():
                m.interest(seq, mask, cand)

        for mode, fn in (("forward_backward", fb), ("forward", fw)):
            fns: dict[str, Callable[[], object]] = {
                impl: (lambda m=m, fn=fn: fn(m)) for impl, m in dins.items()
            }
            med, rounds = calibrated_interleaved(
                fns, "cpu", max_seconds, min_rounds=3, max_rounds=max_rounds, warmup=1
            )
            mem = {impl: peak_memory(f, "cpu") for impl, f in fns.items()}
            recs.append(
                {
                    "B": b,
                    "N": n,
                    "L": schema.SEQ_LEN,
                    "H": dins["fused"].attn_out.in_features,
                    "mode": mode,
                    "rounds": rounds,
                    "ms": {k: round(v * 1e3, 3) for k, v in med.items()},
                    "speedup": round(med["reference"] / med["fused"], 2),
                    "peak_bytes": {k: v["bytes"] for k, v in mem.items()},
                    "memory_method": mem["fused"]["method"],
                }
            )
            seq.grad = cand.grad = None
    return recs


def make_train_step(model: torch.nn.Module, lr: float) -> Callable[[Any], None]:
    """One training step on a batch: forward of every stage, joint loss, backward, Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(batch: Any) -> None:
        total, _ = model(batch)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def _loss_only(model: torch.nn.Module, batch: Any) -> Callable[[], None]:
    """The operator + joint loss, forward and backward, on the stages' scores (detached)."""
    with torch.no_grad():
        scores = [s.float() for s in model.scores(batch)]

    def run() -> None:
        leaves = [s.clone().requires_grad_() for s in scores]
        total, _ = model.loss(leaves, batch)
        total.backward()

    return run


def step_records(
    lines: dict[str, Callable[[], torch.nn.Module]],
    batch: Any,
    *,
    lr: float,
    rounds: int,
    warmup: int = 2,
    loss_share: bool = True,
) -> dict[str, dict[str, Any]]:
    """Every line's step time over the same ``batch`` in interleaved rounds (and, with
    ``loss_share``, its operator + loss time in the same rounds): name -> spread + samples/s."""
    fns: dict[str, Callable[[], object]] = {}
    for name, build in lines.items():
        model = build()
        step = make_train_step(model, lr)
        fns[name] = lambda step=step: step(batch)
        if loss_share:
            fns[name + "/op_loss"] = _loss_only(model, batch)
    times = interleaved_times(fns, "cpu", rounds, warmup=warmup)
    out = {}
    for name in lines:
        rec = spread(times[name])
        rec["samples_per_s"] = round(batch.batch_size / rec["median_s"], 2)
        if loss_share:
            ol = statistics.median(times[name + "/op_loss"])
            rec["op_loss_s"] = ol
            rec["op_loss_share"] = round(ol / rec["median_s"], 4)
        out[name] = rec
    return out


def compare_tables(paths: Sequence[str], reference: str = "dftopk") -> str:
    """Several step tables side by side as ratios t(m, N) / t(reference, N), the quantity
    equal compute depends on (a table's absolute times drift with the machine's load; its
    ratios should not), with each (m, N)'s spread over the tables: a markdown table."""
    from raytopk.tune.compute import load_step_table

    tables = [load_step_table(p) for p in paths]
    keys = sorted({k for t in tables for k in t.seconds}, key=lambda k: (k[1], k[0]))
    lines = [
        f"Ratios t(m, N) / t({reference}, N); '-': not in that table.",
        "",
        "| N | method | " + " | ".join(f"[{i + 1}]" for i in range(len(tables)))
        + " | max / min |",
        "|---:|---|" + "---:|" * (len(tables) + 1),
    ]
    for m, n in keys:
        rs = []
        for t in tables:
            ok = (m, n) in t.seconds and (reference, n) in t.seconds
            rs.append(t.seconds[(m, n)] / t.seconds[(reference, n)] if ok else None)
        got = [r for r in rs if r is not None]
        cells = " | ".join("-" if r is None else f"{r:.2f}" for r in rs)
        span = f"{max(got) / min(got):.2f}" if len(got) > 1 else ""
        lines.append(f"| {n} | {m} | {cells} | {span} |")
    lines += [""] + [f"[{i + 1}] {t.path} ({t.machine}, batch {t.batch_size})"
                     for i, t in enumerate(tables)]
    return "\n".join(lines) + "\n"
