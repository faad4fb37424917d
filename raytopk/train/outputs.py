"""What a training run shows and leaves behind: progress.csv, TensorBoard event files, the console
lines, metrics.json's table, curves.png. Plain Python on plain dicts: the Ray side (a
controller-side callback) is ``raytopk.ray_env.progress_callback`` around :class:`ProgressLog`.

Metric names come from ``raytopk.metrics.metric_keys`` (one place), so a 3-stage cascade's
headline (``joint_recall@10@10``) shows wherever a 2-stage one's (``joint_recall@10@20``) does.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

from raytopk.metrics import headline_key, metric_keys
from raytopk.train.evaluate import random_key
from raytopk.train.events import DayReport, StepReport, describe, is_last
from raytopk.train.tensorboard import EventLog

__all__ = [
    "eta_text",
    "LAST_REPORT",
    "ProgressLog",
    "metrics_table",
    "plot_curves",
    "progress_line",
    "read_last_report",
]

# The final (or non-finite-loss stop) report of rank 0, written by ProgressLog in the Train
# controller. Ray Train V2's Result.metrics holds the metrics of the latest *checkpoint*, not the
# latest report, so the final evaluation (reported without a checkpoint) is handed over in this
# file.
LAST_REPORT = "last_report.json"


class ProgressLog:
    """After each report: one progress.csv row, its scalars in TensorBoard event files
    (raytopk.train.tensorboard) and one console line (throughput summed over workers, data wait
    averaged); the final report also goes to ``LAST_REPORT``."""

    def __init__(
        self,
        out_dir: str | Path,
        run_name: str,
        num_stages: int,
        verbose: bool,
        total_samples: int = 0,
    ) -> None:
        self.csv_path = str(Path(out_dir) / "progress.csv")
        self.last_path = str(Path(out_dir) / LAST_REPORT)
        self.run_name, self.num_stages, self.verbose = run_name, num_stages, verbose
        self.total_samples = int(total_samples)  # the run's training requests (0: unknown)
        self.rows: list[dict[str, Any]] | None = None
        self.events = EventLog(out_dir)

    def _load(self) -> list[dict[str, Any]]:
        if self.rows is None:
            self.rows = []
            if os.path.isfile(self.csv_path):  # a resumed run appends to its history
                with open(self.csv_path, newline="") as f:
                    self.rows = list(csv.DictReader(f))
        return self.rows

    def __call__(self, metrics: list[dict[str, Any]], checkpoint: str | None) -> None:
        m0 = dict(metrics[0])
        if is_last(m0):
            tmp = self.last_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(m0, f, default=str)
            os.replace(tmp, self.last_path)
        if "samples_per_s" in m0:
            m0["samples_per_s"] = sum(float(m.get("samples_per_s", 0.0)) for m in metrics)
            m0["data_wait_frac"] = sum(float(m.get("data_wait_frac", 0.0)) for m in metrics) / len(
                metrics
            )
        m0["time"] = round(time.time(), 3)
        m0["workers"] = len(metrics)
        if checkpoint is not None:
            m0["checkpoint"] = checkpoint
        row = {k: v for k, v in m0.items() if isinstance(v, int | float | str | bool)}
        rows = self._load()
        rows.append(row)
        header: list[str] = []
        for r in rows:
            header += [k for k in r if k not in header]
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv_path)
        self.events.write(m0)
        if is_last(m0):
            self.events.close()
        if self.verbose:
            line = progress_line(self.run_name, m0, self.num_stages)
            if m0.get("kind") == StepReport.KIND and self.total_samples:
                line += " | " + eta_text(m0, self.total_samples)
            print(line, flush=True)


def read_last_report(out_dir: str | Path) -> dict[str, Any] | None:
    p = Path(out_dir) / LAST_REPORT
    return json.loads(p.read_text()) if p.is_file() else None


def eta_text(m: dict[str, Any], total_samples: int) -> str:
    """ "12,800/36,000 samples (36%), training ETA 1m05s": the run's progress and the time its
    remaining training samples take at the window's rate (evaluations not included)."""
    seen, rate = int(m.get("samples_seen", 0)), float(m.get("samples_per_s", 0.0))
    left = max(0, total_samples - seen)
    eta = left / rate if rate > 0 else float("inf")
    when = "?" if eta == float("inf") else f"{int(eta // 60)}m{int(eta % 60):02d}s"
    return f"{seen:,}/{total_samples:,} samples ({seen / total_samples:.0%}), training ETA {when}"


def progress_line(name: str, m: dict[str, Any], num_stages: int = 2) -> str:
    """The console line of report ``m`` (a flat dict; raytopk.train.events.describe)."""
    return describe(name, m, num_stages)


def plot_curves(
    progress_csv: str | Path, png: str | Path, title: str = "", num_stages: int = 2
) -> Path | None:
    """Training curves from progress.csv: loss parts, throughput / data wait, streaming recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(progress_csv)
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("kind") == StepReport.KIND]
    days = [r for r in rows if r.get("kind") == DayReport.KIND]

    def col(rs: list[dict[str, str]], key: str) -> list[float]:
        out = []
        for r in rs:
            try:
                out.append(float(r.get(key) or "nan"))
            except ValueError:
                out.append(float("nan"))
        return out

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = col(steps, "samples_seen")
    loss_keys = ["loss"] + sorted(
        k for k in (steps[0] if steps else {}) if k.startswith("stage") or k == "joint"
    )
    for k in loss_keys:
        axes[0].plot(x, col(steps, k), label=k)
    axes[0].set_xlabel("training samples (requests)")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(x, col(steps, "samples_per_s"), color="tab:blue")
    axes[1].set_xlabel("training samples (requests)")
    axes[1].set_ylabel("samples/s (all workers)", color="tab:blue")
    ax2 = axes[1].twinx()
    ax2.plot(x, col(steps, "data_wait_frac"), color="tab:red")
    ax2.set_ylabel("data-wait fraction", color="tab:red")
    stream = "stream_" + headline_key(num_stages)
    if days and stream in days[0]:
        axes[2].plot(col(days, "samples_seen"), col(days, stream), "o-")
        axes[2].set_ylabel(f"next-day {headline_key(num_stages)}")
    else:
        axes[2].plot(col(days, "samples_seen"), col(days, "day_loss"), "o-")
        axes[2].set_ylabel("mean loss of the day")
    axes[2].set_xlabel("training samples (requests)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def metrics_table(m: dict[str, Any], num_stages: int = 2) -> str:
    """Markdown table: each test metric beside what random selection scores on the same data."""
    rows = [(key, random_key(key)) for key in metric_keys(num_stages)]
    rows += [(k, random_key(k)) for k in sorted(m) if k.startswith("corpus_recall@")]
    out = ["| metric | this run | random selection |", "|---|---:|---:|"]
    for key, rand in rows:
        if key not in m:
            continue
        r = m.get(rand)
        r_txt = f"{r:.4f}" if isinstance(r, float) else ("0.0000" if "tau" in key else "-")
        v = f"{m[key]:.4f}" if isinstance(m[key], float) else m[key]
        out.append(f"| {key} | {v} | {r_txt} |")
    out.append(
        f"\n{int(m.get('samples_seen', 0)):,} training samples in "
        f"{float(m.get('train_seconds', 0)):.1f} s of training "
        f"({float(m.get('wall_seconds', 0)):.1f} s wall); outputs in {m.get('output_dir', '')}"
    )
    return "\n".join(out)
