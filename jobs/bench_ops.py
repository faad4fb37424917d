"""Operator benchmark of raytopk: operator-level sweeps (docs/protocol.md §5.2) and the DFTopK
paper's step-level runtime protocol (docs/protocol.md §5.1), every registered operator side by
side with the authors' DFTopK formulation and the elementwise floor, measured in the same run.

    PYTHONPATH=. python jobs/bench_ops.py --quick                # ~1-2 min on a 2-core CPU
    PYTHONPATH=. python jobs/bench_ops.py                        # full sweep, < ~15 min
    PYTHONPATH=. python jobs/bench_ops.py --device cuda --select-compare

Operator level: forward and forward+backward (BCE against a top-k label) timed separately,
B ∈ {1, 1024}, N ∈ {10, 40, 200, 1000, 10⁴, 10⁵}, k ∈ {10, N//2} (clipped to N − 1), plus the target
shape (B=64, N=10⁵, k=100; docs/protocol.md §5.3); peak extra memory of forward+backward.
Definitions (what is timed, how memory is measured on CPU and CUDA, the skip rules) are in
raytopk/bench/op_sweeps.py, raytopk/bench/harness.py and raytopk/bench/step.py.

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

from raytopk.bench.machine import machine_info  # noqa: E402
from raytopk.bench.op_sweeps import (  # noqa: E402
    HEADLINE_SHAPES,
    bench_operators,
    build_lines,
    headline,
    measure_memory,
    operator_configs,
)
from raytopk.bench.op_tables import (  # noqa: E402
    TARGET_SHAPES,
    markdown_headline,
    markdown_operator_tables,
    plot,
    targets,
)
from raytopk.bench.step import STEP_SIZES, bench_steps, markdown_step_table  # noqa: E402

__all__ = ["main", "parse_args", "settings", "run", "targets", "plot"]

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
        help="also time dftopk once per select (numba on CPU, TORCH_SELECTS) side by side",
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
        "--threads",
        type=int,
        default=None,
        help="torch and numba threads (default: the libraries' defaults, all cores)",
    )
    p.add_argument(
        "--no-target-shapes",
        action="store_true",
        help=f"leave out the target shapes {list(TARGET_SHAPES)} (B, N, k)",
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
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads should be >= 1 but got {args.threads}")
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        from raytopk.train.loop import set_threads  # numba's pool before torch's (see there)

        set_threads(args.threads)
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
        print("\n**step level** (docs/protocol.md §5.1: batch 1, k = n//2, mean ms per step)\n")
        print(markdown_step_table(result["step"]))
    print("\n**targets**: " + json.dumps(result["targets"], indent=1))
    path = out / "bench_ops.json"
    path.write_text(json.dumps(result, indent=1))
    pngs = plot(result, out)
    print(f"\nwrote {path} " + " ".join(str(p) for p in pngs))
    return result


if __name__ == "__main__":
    main()
