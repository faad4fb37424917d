"""Operator benchmark of raytopk (issue 2, "Benchmark"): operator-level sweeps and the DFTopK
paper's step-level runtime protocol (SPEC.md §5), every registered operator side by side with
the authors' DFTopK formulation and the elementwise floor, measured in the same run.

    PYTHONPATH=. python jobs/bench_ops.py --quick                # ~1-2 min on a 2-core CPU
    PYTHONPATH=. python jobs/bench_ops.py                        # full sweep, < ~15 min
    PYTHONPATH=. python jobs/bench_ops.py --device cuda --select-compare

Operator level: forward and forward+backward (BCE against a top-k label) timed separately,
B ∈ {1, 1024}, N ∈ {10, 40, 200, 1000, 10⁴, 10⁵}, k ∈ {10, N//2} (clipped to N − 1), plus the
issue's target shape (B=64, N=10⁵, k=100); peak extra memory of forward+backward. Definitions
(what is timed, how memory is measured on CPU and CUDA, the skip rules) are in
raytopk/bench/ops.py and raytopk/bench/step.py.

Writes <out>/bench_ops.json (machine, settings, every record, target summary),
<out>/bench_ops_operator.png and <out>/bench_ops_step.png; prints markdown tables. Imports
neither Ray nor faiss (runs on a bare torch + numba + matplotlib machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raytopk.bench.ops import (  # noqa: E402
    HEADLINE_SHAPES,
    bench_operators,
    build_lines,
    headline,
    machine_info,
    markdown_headline,
    markdown_operator_tables,
    measure_memory,
    operator_configs,
)
from raytopk.bench.step import STEP_SIZES, bench_steps, markdown_step_table  # noqa: E402

__all__ = ["main", "parse_args", "settings", "run", "targets", "plot"]

TARGET_SHAPES = ((1024, 200, 10), (64, 100_000, 100))

FULL = {
    "batches": [1, 1024],
    "sizes": [10, 40, 200, 1000, 10_000, 100_000],
    "ks": ["10", "N//2"],
    "warmup": 3,
    "repeats": 20,
    "max_seconds": 2.0,  # timed calls per measurement stop after this much time
    "time_budget_s": 10.0,  # skip a measurement whose extrapolated single call exceeds this
    "step_sizes": list(STEP_SIZES),
    "step_warmup": 10,
    "step_steps": 90,
    "step_max_seconds": 10.0,
    "step_time_budget_s": 5.0,
}
QUICK = {
    **FULL,
    "sizes": [10, 200, 10_000],
    "warmup": 1,
    "repeats": 5,
    "max_seconds": 0.3,
    "time_budget_s": 1.0,
    "step_sizes": [10, 100, 1000],
    "step_warmup": 3,
    "step_steps": 20,
    "step_max_seconds": 1.0,
    "step_time_budget_s": 1.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="subset of sizes, fewer repeats")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default="runs/bench_ops", help="output directory")
    p.add_argument("--ops", nargs="+", default=None, help="operators (default: list_ops())")
    p.add_argument(
        "--select-compare",
        action="store_true",
        help="also time dftopk with select=numba (CPU) / topk / kthvalue side by side",
    )
    p.add_argument("--mem-budget-gb", type=float, default=4.0, help="skip above this estimate")
    p.add_argument("--no-step", action="store_true", help="operator level only")
    p.add_argument(
        "--headline-shapes",
        nargs="+",
        default=[f"{b},{n},{k}" for b, n, k in HEADLINE_SHAPES],
        help="B,N,k shapes of the headline comparison",
    )
    p.add_argument(
        "--headline-only",
        action="store_true",
        help="only the interleaved DFTopK vs authors / sort / floor comparison (~1-2 min)",
    )
    p.add_argument("--seed", type=int, default=0)
    # Overrides of the quick/full settings (small runs in tests, one shape on a GPU box).
    p.add_argument("--batches", type=int, nargs="+", default=None, help="override B values")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="override N values")
    p.add_argument("--step-sizes", type=int, nargs="+", default=None, help="override step n")
    p.add_argument("--repeats", type=int, default=None, help="override timed calls per shape")
    p.add_argument(
        "--no-target-shapes",
        action="store_true",
        help=f"leave out the issue's target shapes {list(TARGET_SHAPES)} (B, N, k)",
    )
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device!r}: CUDA is not available on this machine")
    for name in ("batches", "sizes", "step_sizes"):
        vals = getattr(args, name)
        if vals is not None and min(vals) < (2 if name == "sizes" else 1):
            p.error(f"--{name.replace('_', '-')} should be positive (N >= 2) but got {vals}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats should be >= 1 but got {args.repeats}")
    if args.mem_budget_gb <= 0:
        p.error(f"--mem-budget-gb should be > 0 but got {args.mem_budget_gb}")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved sweep settings (saved in the JSON)."""
    s = dict(QUICK if args.quick else FULL)
    for name in ("batches", "sizes", "step_sizes", "repeats"):
        if getattr(args, name) is not None:
            s[name] = getattr(args, name)
    s.update(
        quick=args.quick,
        device=args.device,
        ops=args.ops,
        select_compare=args.select_compare,
        mem_budget_gb=args.mem_budget_gb,
        seed=args.seed,
        extra_shapes=[] if args.no_target_shapes else [list(t) for t in TARGET_SHAPES],
    )
    return s


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run both levels and return the JSON-able result (no files written)."""
    from raytopk.ops import get_spec, list_ops

    s = settings(args)
    from raytopk.ops import warmup

    warmup("dftopk")  # numba compiles on first use: never inside a timed call
    t_head = time.perf_counter()
    shapes = [tuple(int(v) for v in t.split(",")) for t in args.headline_shapes]
    head = headline(
        args.device, shapes=shapes, max_seconds=2.0 if args.quick else 6.0, seed=args.seed
    )
    log(f"headline done in {time.perf_counter() - t_head:.0f} s")
    if args.headline_only:
        return {
            "machine": machine_info(args.device),
            "settings": s,
            "headline": head,
            "seconds": {"total": round(time.perf_counter() - t_head, 1)},
        }
    ops = list_ops() if args.ops is None else args.ops
    for name in ops:
        get_spec(name)  # ValueError naming the operator and the registered ones
    lines = build_lines(ops, select_compare=args.select_compare, device=args.device)
    configs = operator_configs(s["batches"], s["sizes"], s["ks"], s["extra_shapes"])
    t0 = time.perf_counter()
    records = bench_operators(
        lines,
        configs,
        device=args.device,
        warmup=s["warmup"],
        repeats=s["repeats"],
        max_seconds=s["max_seconds"],
        time_budget_s=s["time_budget_s"],
        mem_budget_gb=args.mem_budget_gb,
        seed=args.seed,
        log=log,
    )
    t_ops = time.perf_counter() - t0
    steps: list[dict[str, Any]] = []
    if not args.no_step:
        steps = bench_steps(
            ["authors_dftopk", *ops],
            s["step_sizes"],
            device=args.device,
            warmup=s["step_warmup"],
            steps=s["step_steps"],
            max_seconds=s["step_max_seconds"],
            time_budget_s=s["step_time_budget_s"],
            seed=args.seed,
            log=log,
        )
    t_steps = time.perf_counter() - t0 - t_ops
    # Memory last: on CPU it pins glibc's mmap threshold, which would change later timings.
    measure_memory(lines, records, device=args.device, seed=args.seed)
    return {
        "machine": machine_info(args.device),
        "settings": s,
        "seconds": {
            "operator": round(t_ops, 1),
            "step": round(t_steps, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "headline": head,
        "operator": records,
        "step": steps,
        "targets": targets(records, steps),
    }


def _rec(records, line, b, n, k, mode="forward_backward"):
    for r in records:
        if (r["line"], r["B"], r["N"], r["k"], r["mode"]) == (line, b, n, k, mode):
            return r if r["status"] == "ok" else None
    return None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return None if a is None or b is None else round(a["median_ms"] / b["median_ms"], 3)


def targets(records: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets as measured here (None where a shape was not measured)."""
    out: dict[str, Any] = {}
    for b, n, k in TARGET_SHAPES:
        out[f"speedup_vs_authors_B{b}_N{n}_k{k}"] = _ratio(
            _rec(records, "authors_dftopk", b, n, k), _rec(records, "dftopk", b, n, k)
        )
    worst = None
    for r in records:
        if r["line"] != "dftopk" or r["status"] != "ok":
            continue
        ref = _rec(records, "authors_dftopk", r["B"], r["N"], r["k"], r["mode"])
        if ref is not None:
            sp = ref["median_ms"] / r["median_ms"]
            if worst is None or sp < worst[0]:
                worst = (sp, r["B"], r["N"], r["k"], r["mode"])
    if worst is not None:
        out["min_speedup_vs_authors"] = {
            "speedup": round(worst[0], 3),
            "B": worst[1],
            "N": worst[2],
            "k": worst[3],
            "mode": worst[4],
        }
    big = sorted({(r["B"], r["N"], r["k"]) for r in records if r["N"] >= 100_000})
    for b, n, k in big:
        d = _rec(records, "dftopk", b, n, k)
        out[f"dftopk_over_floor_B{b}_N{n}_k{k}"] = _ratio(
            d, _rec(records, "elementwise_floor", b, n, k)
        )
        out[f"lapsum_over_dftopk_B{b}_N{n}_k{k}"] = _ratio(_rec(records, "lapsum", b, n, k), d)
    peaks = [
        r["peak_over_scores"] for r in records if r["line"] == "dftopk" and "peak_over_scores" in r
    ]
    out["dftopk_max_peak_over_scores"] = round(max(peaks), 3) if peaks else None
    at_or_below = {}
    for r in steps:
        if r.get("anchor_ms") is not None and r["status"] == "ok":
            at_or_below[f"{r['line']}_n{r['n']}"] = r["mean_ms"] <= r["anchor_ms"]
    out["step_at_or_below_authors_figure"] = at_or_below
    return out


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """bench_ops_operator.png (forward+backward time vs N per B and k rule) and
    bench_ops_step.png (step time vs n)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    recs = [
        r
        for r in result["operator"]
        if r["mode"] == "forward_backward" and r["status"] == "ok" and r["k_rule"] != "fixed"
    ]
    batches = sorted({r["B"] for r in recs})
    rules = sorted({r["k_rule"] for r in recs})
    if recs:
        fig, axes = plt.subplots(
            len(batches), len(rules), figsize=(6 * len(rules), 4 * len(batches)), squeeze=False
        )
        lines = list(dict.fromkeys(r["line"] for r in result["operator"]))
        for i, b in enumerate(batches):
            for j, rule in enumerate(rules):
                ax = axes[i][j]
                for line in lines:
                    pts = sorted(
                        (r["N"], r["median_ms"])
                        for r in recs
                        if r["line"] == line and r["B"] == b and r["k_rule"] == rule
                    )
                    if pts:
                        style = "--" if line in ("authors_dftopk", "elementwise_floor") else "-"
                        ax.plot(*zip(*pts), style, marker="o", ms=3, label=line)
                ax.set(xscale="log", yscale="log", xlabel="N", ylabel="ms (median)")
                ax.set_title(f"forward+backward, B={b}, k={rule}")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        m = result["machine"]
        fig.suptitle(f"raytopk operators on {m['device_name']} (torch {m['torch']})", fontsize=10)
        fig.tight_layout()
        paths.append(out / "bench_ops_operator.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    steps = [r for r in result["step"] if r["status"] == "ok"]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for line in dict.fromkeys(r["line"] for r in steps):
            pts = sorted((r["n"], r["mean_ms"]) for r in steps if r["line"] == line)
            ax.plot(*zip(*pts), marker="o", ms=3, label=line)
        ax.set(xscale="log", yscale="log", xlabel="n candidates (k = n//2, batch 1)")
        ax.set(ylabel="ms per training step (mean)")
        ax.set_title("step-level protocol (SPEC §5)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "bench_ops_step.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    m = result["machine"]
    print(
        f"\n## raytopk operator benchmark — {m['device_name']} ({m['cpu_cores']} cores, "
        f"torch {m['torch']}, {m['torch_threads']} threads, device {m['device']}), "
        f"{'quick' if args.quick else 'full'} run, {result['seconds']['total']} s"
    )
    print(
        "\n**DFTopK headline** (interleaved rounds, median; forward+backward = BCE-with-logits "
        "against a top-k label)\n"
    )
    print(markdown_headline(result["headline"]))
    if args.headline_only:
        path = out / "bench_ops_headline.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")
        return result
    print(markdown_operator_tables(result["operator"]))
    if result["step"]:
        print("\n**step level** (SPEC §5: batch 1, k = n//2, mean ms per step)\n")
        print(markdown_step_table(result["step"]))
    print("\n**targets**: " + json.dumps(result["targets"], indent=1))
    path = out / "bench_ops.json"
    path.write_text(json.dumps(result, indent=1))
    pngs = plot(result, out)
    print(f"\nwrote {path} " + " ".join(str(p) for p in pngs))
    return result


if __name__ == "__main__":
    main()
