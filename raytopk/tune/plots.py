"""The study's figures: anytime curves with 95% bands, and recall/throughput vs sample_num."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytopk.data import schema
from raytopk.tune.stats import t_interval

__all__ = ["plot_anytime", "plot_scaling"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(ok: list[dict[str, Any]]) -> dict[str, str]:
    """One colour per operator, the same in every panel and both figures (a panel missing an
    operator, e.g. one that did not fit at that N, must not shift the others' colours)."""
    return {op: f"C{i % 10}" for i, op in enumerate(sorted({str(r["op"]) for r in ok}))}


def plot_anytime(
    ok: list[dict[str, Any]], out: Path, key: str, ns: list[int],
    by: Callable[..., dict[str, list[dict[str, Any]]]], mean_curve: Callable[..., list],
) -> dict[str, Path]:
    """anytime.png: validation ``key`` vs training seconds (top row) and vs samples seen
    (bottom row), one column per sample_num, mean over seeds with a 95% t-band per operator."""
    if not ok or not any(r.get("anytime_curve") for r in ok):
        return {}
    plt = _plt()
    colors, handles = _colors(ok), {}
    fig, axes = plt.subplots(2, len(ns), figsize=(5 * len(ns), 8), squeeze=False)
    for j, n in enumerate(ns):
        for op, rs in sorted(by(ok, n).items()):
            for i, x in enumerate(("train_seconds", "samples_seen")):
                c = mean_curve(rs, key, x)
                if not c:
                    continue
                xs = [p[0] for p in c]
                handles[op] = axes[i][j].plot(xs, [p[1].mean for p in c], "o-", label=op, ms=3,
                                              color=colors[op])[0]
                axes[i][j].fill_between(xs, [p[1].low for p in c], [p[1].high for p in c],
                                        color=colors[op], alpha=0.15)
        axes[0][j].set(title=f"sample_num = {n} (N = {schema.N_OWN + n})",
                       xlabel="training seconds", ylabel=key)
        axes[1][j].set(xlabel="training requests seen", ylabel=key)
        for i in range(2):
            axes[i][j].grid(alpha=0.3)
    axes[0][-1].legend([handles[op] for op in sorted(handles)], sorted(handles), fontsize=8)
    fig.tight_layout()
    png = out / "anytime.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"anytime_png": png}


def plot_scaling(ok: list[dict[str, Any]], out: Path, head: str) -> dict[str, Path]:
    """sample_scaling.png: test recall vs samples seen (each trial), steady throughput vs N,
    test recall vs sample_num (mean with 95% interval over seeds)."""
    if not ok:
        return {}
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = _colors(ok)
    for op in sorted(colors):
        rs = [r for r in ok if r["op"] == op]
        ns = sorted({int(r["sample_num"]) for r in rs})

        def ci(key: str, n: int, rs: list[dict[str, Any]] = rs) -> Any:
            return t_interval([float(r.get(key) or 0) for r in rs if int(r["sample_num"]) == n])

        axes[0].plot([float(r["samples_seen"]) for r in rs], [float(r[head]) for r in rs],
                     "o", label=op, color=colors[op])
        axes[1].plot([schema.N_OWN + n for n in ns],
                     [ci("steady_samples_per_s", n).mean for n in ns], "o-", label=op,
                     color=colors[op])
        cs = [ci(head, n) for n in ns]
        axes[2].errorbar(ns, [c.mean for c in cs], yerr=[c.half_width for c in cs],
                         fmt="o-", capsize=3, label=op, color=colors[op])
    axes[0].set(xlabel="training requests seen", ylabel=head, title="test recall vs samples seen")
    axes[1].set(xlabel="candidates per request N", ylabel="steady training requests / s",
                title="throughput per operator", yscale="log")
    axes[2].set(xlabel="sampled negatives per request", ylabel=head,
                title="test recall at equal budget (95% CI)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    png = out / "sample_scaling.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {"png": png}
