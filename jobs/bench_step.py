"""What a training step costs, side by side in one run (raytopk.bench.step_times).

    python jobs/bench_step.py                       # all three parts, CPU, ~25 min on 2 cores
    python jobs/bench_step.py --parts table         # only the step-time table
    python jobs/bench_step.py --device cuda         # the same on a GPU (fused = plain off CPU)
    python jobs/bench_step.py --compare A.json B.json   # tables side by side, as ratios

1. attention: DIN's interest at (B, N) = (128, 1000) and (1024, 200), the fused kernel against
   the plain (B, N, L, H) path, forward+backward and forward alone; extra peak memory per call.
2. step: a whole training step (2 stages, DFTopK, Adam) at batch 128, N ∈ {40, 200, 1000},
   fused against plain attention.
3. table: the step-time table the study matches compute with: every method (the registered
   operators and bce) at batch 128, N ∈ {40, 200, 1000}, fused attention, interleaved rounds
   per N; median and quartiles per method and the operator + loss share of its step. Points
   whose operator memory (the registry's step_bytes, x2 stages) exceeds --mem-budget-gb are
   recorded as skipped with the estimate.

Writes <out>/bench_step.json (parts 1-2, with the goal ratios), <out>/step_times.json (part 3:
the table, the machine, this command) and <out>/bench_step.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

GOALS = {  # fused / plain at these shapes: the targets of docs/protocol.md §5.3
    "attention_fb_128x1000": 5.0,
    "attention_fb_1024x200": 5.0,
    "attention_f_1024x200": 5.0,
}


def _batch(data: Path, day: str, sample_num: int, batch_size: int, device: str) -> Any:
    from raytopk.bench.train import materialise

    return materialise(
        str(data), day, sample_num=sample_num, batch_size=batch_size, seed=0, max_batches=1
    )[0].to(device)


def _builder(data: Path, vocab: dict, method: str, n: int, bs: int, attention: str, device: str):
    from raytopk.train.config import load_config
    from raytopk.train.model import CascadeModel

    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"op.name={method}",
            f"data.sample_num={n - 40}",
            f"data.batch_size={bs}",
            f"model.attention={attention}",
        ],
    )

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return CascadeModel.from_config(cfg, vocab, device).to(device)

    return build, cfg.optim.lr


def _plot(result: dict[str, Any], table: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    att = result.get("attention", [])
    if att:
        labels = [f"{r['mode'].replace('forward_backward', 'fwd+bwd')}\n{r['B']}x{r['N']}"
                  for r in att]  # fmt: skip
        x = range(len(att))
        axes[0].bar([i - 0.2 for i in x], [r["ms"]["reference"] for r in att], 0.4, label="plain")
        axes[0].bar([i + 0.2 for i in x], [r["ms"]["fused"] for r in att], 0.4, label="fused")
        axes[0].set_xticks(list(x), labels)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("ms per call")
        axes[0].set_title("DIN attention (interest)")
        axes[0].legend()
    steps = result.get("step", [])
    if steps:
        ns = [r["N"] for r in steps]
        for impl in ("reference", "fused"):
            axes[1].plot(ns, [r["lines"][impl]["samples_per_s"] for r in steps], "o-",
                         label="plain" if impl == "reference" else impl)  # fmt: skip
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("N candidates")
        axes[1].set_ylabel("samples/s (batch 128)")
        axes[1].set_title("training step, DFTopK")
        axes[1].legend()
    rows = table.get("rows", [])
    if rows:
        for m in sorted({r["method"] for r in rows}):
            pts = sorted((r["N"], r["samples_per_s"]) for r in rows if r["method"] == m)
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        axes[2].set_xscale("log")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("N candidates")
        axes[2].set_ylabel("samples/s (batch 128)")
        axes[2].set_title("step-time table (fused attention)")
        axes[2].legend(fontsize=8)
    fig.suptitle(f"{table.get('machine', result.get('machine', {})).get('device_name', '')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _write(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)  # never a half-written file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench_step")
    p.add_argument("--data-root", default="data/bench_step")
    p.add_argument("--requests-per-day", type=int, default=1000)
    p.add_argument("--parts", default="attention,step,table")
    p.add_argument("--ns", default="40,200,1000", help="N per request (40 + sample_num)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--methods", default="", help="comma list; default every method")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per N (table)")
    p.add_argument("--step-rounds", type=int, default=3, help="rounds of the fused/plain step")
    p.add_argument("--attention-seconds", type=float, default=60.0)
    p.add_argument("--mem-budget-gb", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=0, help="torch, numba threads; 0: defaults")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--append",
        action="store_true",
        help="table: keep <out>/step_times.json's rows at other N (same machine and batch) and "
        "replace those at --ns; both commands are recorded",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="STEP_TIMES_JSON",
        help="measure nothing: print these step tables side by side as ratios to dftopk's step",
    )
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"attention", "step", "table"}:
        p.error(f"--parts: unknown part(s) {sorted(parts - {'attention', 'step', 'table'})}")
    ns = [int(x) for x in args.ns.split(",")]
    if any(n < 40 for n in ns):
        p.error(f"--ns: every N must be >= 40 (the 40 own candidates), got {ns}")

    if args.compare:
        from raytopk.bench.step_times import compare_tables

        try:
            print(compare_tables(args.compare), end="")
        except (ValueError, KeyError) as e:
            p.error(f"--compare: {e}")
        return 0

    from raytopk.bench.machine import machine_info
    from raytopk.bench.step_times import STAGES, attention_records, step_records
    from raytopk.data.convert import read_meta
    from raytopk.data.synthetic import prepare_synthetic
    from raytopk.losses import list_methods
    from raytopk.losses.forms import is_operator, step_bytes, step_fits
    from raytopk.models.attention import warmup as warmup_attention
    from raytopk.ops import warmup as warmup_op

    if args.threads:
        from raytopk.train.loop import set_threads  # torch's and numba's (DIN's fused kernel)

        set_threads(args.threads)
    methods = args.methods.split(",") if args.methods else list_methods()
    bad = [m for m in methods if m not in list_methods()]
    if bad:
        p.error(f"--methods: unknown {bad}; valid: {list_methods()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = args.device
    data = Path(
        prepare_synthetic(
            Path(args.data_root), days=2, requests_per_day=args.requests_per_day, seed=0
        )
    )
    meta = read_meta(data, "--data-root")
    vocab, day = dict(meta["vocab"]), sorted(meta["days"])[0]
    if dev == "cpu":
        warmup_attention()
    command = "python jobs/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = machine_info(dev)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine, "command": command.strip()}

    if "attention" in parts:
        att = attention_records(vocab, [(128, 1000), (1024, 200)], args.attention_seconds, 10)
        result["attention"] = att
        for r in att:
            print(f"attention {r['mode']:16s} B={r['B']:4d} N={r['N']:4d}: plain "
                  f"{r['ms']['reference']:9.1f} ms, fused {r['ms']['fused']:7.1f} ms -> "
                  f"{r['speedup']:.1f}x; peak {r['peak_bytes']['reference'] / 2**20:,.0f} MiB "
                  f"vs {r['peak_bytes']['fused'] / 2**20:,.0f} MiB", flush=True)  # fmt: skip

    if "step" in parts:
        warmup_op("dftopk")
        result["step"] = []
        for n in ns:
            b = _batch(data, day, n - 40, args.batch_size, dev)
            lines = {}
            for impl in ("reference", "fused") if dev == "cpu" else ("reference",):
                lines[impl], lr = _builder(data, vocab, "dftopk", n, args.batch_size, impl, dev)
            rec = step_records(lines, b, lr=lr, rounds=args.step_rounds, warmup=1,
                               loss_share=False)  # fmt: skip
            row = {"N": n, "B": args.batch_size, "op": "dftopk", "lines": rec}
            if "fused" in rec:
                row["speedup"] = round(rec["reference"]["median_s"] / rec["fused"]["median_s"], 2)
            result["step"].append(row)
            print(f"step N={n:4d}: " + ", ".join(
                f"{k} {v['samples_per_s']:,.1f} samples/s" for k, v in rec.items()
            ) + (f" -> {row['speedup']:.1f}x" if "speedup" in row else ""), flush=True)

    goals = {}
    for r in result.get("attention", []):
        key = ("attention_fb_" if r["mode"] == "forward_backward" else "attention_f_") + (
            f"{r['B']}x{r['N']}"
        )
        if key in GOALS:
            goals[key] = {"ratio": r["speedup"], "goal": GOALS[key],
                          "met": r["speedup"] >= GOALS[key]}  # fmt: skip
    result["goals"] = goals
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if {"attention", "step"} & parts:
        _write(out / "bench_step.json", result)

    table: dict[str, Any] = {}
    if "table" in parts:
        for m in methods:
            if is_operator(m):
                warmup_op(m)
        table = {
            "machine": machine,
            "command": command.strip(),
            "batch_size": args.batch_size,
            "attention": "fused" if dev == "cpu" else "reference",
            "what": "seconds per training step (2 stages: forward, joint loss, backward, Adam) "
            "on one fixed batch, interleaved rounds; op_loss_s = the operator + loss forward "
            "and backward on the stages' scores, in the same rounds",
            "rows": [],
            "skipped": [],
        }
        old_path = out / "step_times.json"
        if args.append and old_path.is_file():
            old = json.loads(old_path.read_text())
            if old.get("batch_size") != args.batch_size or old.get("machine", {}).get(
                "cpu_model"
            ) != machine.get("cpu_model"):
                p.error(f"--append: {old_path} was measured at another batch size or machine")
            table["rows"] = [r for r in old["rows"] if r["N"] not in ns]
            table["skipped"] = [r for r in old.get("skipped", []) if r["N"] not in ns]
            table["commands"] = [*old.get("commands", [old.get("command")]), command.strip()]
            table["parts_wall_s"] = [*old.get("parts_wall_s", [old.get("wall_s")])]
        t_table = time.perf_counter()
        for n in ns:
            b = _batch(data, day, n - 40, args.batch_size, dev)
            lines = {}
            for m in methods:
                if is_operator(m):
                    need = step_bytes(m, args.batch_size, n, STAGES)
                    if not step_fits(m, args.batch_size, n, STAGES, args.mem_budget_gb):
                        table["skipped"].append({"method": m, "N": n, "reason":
                            f"needs ~{need / 2**30:.1f} GiB > --mem-budget-gb {args.mem_budget_gb:g}"})  # noqa: E501  # fmt: skip
                        print(f"table N={n:4d} {m:12s} skipped ({need / 2**30:.1f} GiB)")
                        continue
                impl = "fused" if dev == "cpu" else "reference"
                lines[m], lr = _builder(data, vocab, m, n, args.batch_size, impl, dev)
            recs = step_records(lines, b, lr=lr, rounds=args.rounds)
            for m, rec in recs.items():
                table["rows"].append({"method": m, "N": n, **rec})
                print(f"table N={n:4d} {m:12s} {rec['samples_per_s']:9,.1f} samples/s  step "
                      f"{rec['median_s'] * 1e3:8.1f} ms [{rec['q25_s'] * 1e3:.1f}, "
                      f"{rec['q75_s'] * 1e3:.1f}]  op+loss {rec['op_loss_share']:.1%}",
                      flush=True)  # fmt: skip
            table["wall_s"] = round(time.perf_counter() - t_table, 1)
            table["rows"].sort(key=lambda r: (r["N"], methods.index(r["method"])
                                              if r["method"] in methods else 99))  # fmt: skip
            _write(out / "step_times.json", table)  # after every N: a partial table survives
    _plot(result, table, out / "bench_step.png")
    for k, g in goals.items():
        print(f"goal {k}: {g['ratio']:.1f}x (goal >= {g['goal']:.0f}x): "
              f"{'met' if g['met'] else 'NOT met'}")  # fmt: skip
    print(f"wrote {out}/ in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
