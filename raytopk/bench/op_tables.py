"""Reports of the operator benchmark (jobs/bench_ops.py): markdown tables of the sweep and the
headline comparison, the performance targets (docs/protocol.md §5.3) computed from the records,
and the PNG plots.

Notation: B = rows (requests), N = scores per row, k = selected per row. A record is one
measurement of ``raytopk.bench.op_sweeps.bench_operators`` (keys line, B, N, k, mode, status,
median_ms, …); a headline record one shape × mode of ``raytopk.bench.op_sweeps.headline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TARGET_SHAPES",
    "fmt_bytes",
    "markdown_operator_tables",
    "markdown_headline",
    "targets",
    "plot",
]

# The operator target shapes (B, N, k) of docs/protocol.md §5.3.
TARGET_SHAPES = ((1024, 200, 10), (64, 100_000, 100))


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


def _rec(records, line, b, n, k, mode="forward_backward"):
    for r in records:
        if (r["line"], r["B"], r["N"], r["k"], r["mode"]) == (line, b, n, k, mode):
            return r if r["status"] == "ok" else None
    return None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return None if a is None or b is None else round(a["median_ms"] / b["median_ms"], 3)


def targets(records: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The performance targets (docs/protocol.md §5.3) as measured here (None where a shape was
    not measured)."""
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
        ax.set_title("step-level protocol (docs/protocol.md §5.1)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "bench_ops_step.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
