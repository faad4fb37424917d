"""The study's outputs from its trial rows (plain Python; raytopk.tune.stats does the arithmetic).

- ``results.csv``: one row per final trial (identity, status, budget, throughput, test metrics,
  the validation headline at the budget, time accounting);
- ``anytime.csv``: one row per (trial, evaluation point): training seconds, samples seen,
  validation headline;
- ``results.md``: per sample_num, each operator's test headline as mean ± 95% t-interval over
  seeds, its paired difference to the reference operator (same seeds) with its interval and the
  verdict ("better"/"worse" only where the interval excludes 0), steady-state throughput with
  its interval; training seconds to reach X% of the best final validation recall; the cost of a
  trial (training, evaluation, overhead); the parameter selection (chosen values, whole search);
  trials not run, with why;
- ``anytime.png`` (validation recall vs training seconds and vs samples seen, mean with a 95%
  band per operator, one panel per sample_num) and ``sample_scaling.png``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from raytopk.data import schema
from raytopk.metrics import headline_key, metric_keys
from raytopk.train.anytime import valid_metric
from raytopk.tune.stats import paired_difference, t_interval, time_to_fraction, verdict

__all__ = ["RESULT_COLUMNS", "result_columns", "write_reports", "write_selection", "FRACTIONS"]

_TRIAL_COLUMNS = (
    "trial", "op", "loss_form", "op_params", "sample_num", "num_candidates", "seed", "status",
    "samples_seen", "train_seconds", "samples_per_second", "steady_samples_per_s",
    "budget_seconds", "max_step_seconds",
)
_TAIL_COLUMNS = ("eval_seconds", "overhead_seconds", "wall_seconds", "node", "init_param_digest")
FRACTIONS = (0.8, 0.9, 0.95)  # "seconds to reach X% of the best final validation recall"


def result_columns(num_stages: int = 2) -> tuple[str, ...]:
    """results.csv's columns before the corpus_recall@10@<M> ones: the trial's identity and
    budget, then the validation headline at the budget and the test-day metrics of a
    ``num_stages`` cascade (raytopk.metrics)."""
    return (*_TRIAL_COLUMNS, valid_metric(headline_key(num_stages)), *metric_keys(num_stages))


RESULT_COLUMNS = result_columns(2)


def _columns(rows: list[dict[str, Any]], num_stages: int) -> list[str]:
    corpus = sorted(
        {k for r in rows for k in r if k.startswith("corpus_recall@")},
        key=lambda k: int(k.rsplit("@", 1)[-1]),
    )
    return [*result_columns(num_stages), *corpus, *_TAIL_COLUMNS]


def _write_csv(path: Path, cols: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    os.replace(tmp, path)


def _curve(r: dict[str, Any]) -> list[dict[str, Any]]:
    c = r.get("anytime_curve") or []
    return json.loads(c) if isinstance(c, str) else list(c)


def write_selection(
    rows: list[dict[str, Any]],
    joint: dict[tuple[str, int], dict[str, Any]],
    grid: dict[str, list[float]],
    out: str | Path,
    head: str,
) -> None:
    """selection.csv (every selection trial) and selection.json (grids, the chosen parameter
    value and learning rate per (op, N) with their mean validation score over seeds, trials,
    each with its configuration digest: the row log's rows the choice was made from).
    ``joint``: raytopk.tune.selection.choose_joint's choice."""
    out = Path(out)
    key = valid_metric(head)
    # round: 0 the grid, r >= 1 later rounds: extensions, or completions (completes: the clock
    # value at which ASHA had stopped the trial this row runs to the end)
    cols = ["trial", "op", "sample_num", "seed", "param", "value", "lr", "round", "completes",
            "status", key, "train_seconds", "samples_seen", "wall_seconds", "config_digest"]
    _write_csv(out / "selection.csv", cols, rows)
    chosen: dict[str, dict[str, Any]] = {}
    for (op, n), c in joint.items():
        chosen.setdefault(op, {})[str(n)] = dict(c)
    doc = {
        "metric": key,
        "grid": grid,
        "chosen": chosen,
        "trials": [{c: r.get(c) for c in cols if c in r} for r in rows],
    }
    tmp = out / "selection.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, out / "selection.json")


def _by(rows: list[dict[str, Any]], n: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if int(r["sample_num"]) == n:
            out.setdefault(str(r["op"]), []).append(r)
    return out


def _mean_curve(rs: list[dict[str, Any]], key: str, x: str) -> list[tuple[float, Any]]:
    """Per evaluation point: (mean x over seeds, t-interval of ``key`` over seeds)."""
    points: dict[int, list[dict[str, Any]]] = {}
    for r in rs:
        for p in _curve(r):
            if key in p:
                points.setdefault(int(p["point"]), []).append(p)
    return [
        (sum(float(p[x]) for p in ps) / len(ps), t_interval([float(p[key]) for p in ps]))
        for _, ps in sorted(points.items())
    ]


def write_reports(
    rows: list[dict[str, Any]], out: str | Path, num_stages: int = 2, reference: str = "dftopk"
) -> dict[str, Path]:
    """results.csv, anytime.csv, results.md and the plots from the final trial rows; written
    atomically. Paired differences are taken to ``reference`` at the same seeds."""
    out = Path(out)
    head = headline_key(num_stages)
    vhead = valid_metric(head)
    _write_csv(out / "results.csv", _columns(rows, num_stages), rows)
    curve_rows = [
        {"trial": r.get("trial"), "op": r.get("op"), "sample_num": r.get("sample_num"),
         "seed": r.get("seed"), **p}
        for r in rows for p in _curve(r)
    ]
    _write_csv(out / "anytime.csv", ["trial", "op", "sample_num", "seed", "point",
                                     "train_seconds", "samples_seen", vhead], curve_rows)

    ok = [r for r in rows if r.get("status") == "ok" and head in r]
    md = [
        "# Sample scaling at equal compute",
        "",
        f"Test-day {head}: mean ± 95% t-interval over seeds. Paired difference: the operator "
        f"minus {reference} at the same seed (same data order, negatives and initial weights), "
        "mean ± 95% t-interval; 'better'/'worse' only where that interval excludes 0. "
        "Throughput: steady-state training requests per second after warm-up, mean ± 95% "
        "interval over seeds.",
        "",
    ]
    ns = sorted({int(r["sample_num"]) for r in rows if r.get("sample_num") not in ("", None)})
    for n in ns:
        by_op = _by(ok, n)
        ref = {int(r["seed"]): float(r[head]) for r in by_op.get(reference, [])}
        md += [
            f"## sample_num = {n} (N = {schema.N_OWN + n} candidates per request)",
            "",
            f"| op | {head} | vs {reference} (paired) | verdict | steady samples/s | "
            "samples seen | seeds |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        stats = sorted(
            ((t_interval([float(r[head]) for r in rs]), op, rs) for op, rs in by_op.items()),
            key=lambda s: -s[0].mean,
        )
        for ci, op, rs in stats:
            vals = {int(r["seed"]): float(r[head]) for r in rs}
            if op == reference:
                diff_txt, word = "(reference)", ""
            else:
                diff = paired_difference(vals, ref)
                diff_txt = "-" if diff is None else diff.text()
                word = verdict(diff)
            tp = t_interval([float(r.get("steady_samples_per_s") or 0) for r in rs])
            seen = sum(float(r["samples_seen"]) for r in rs) / len(rs)
            form = f" ({rs[0]['loss_form']})" if rs[0].get("loss_form") else ""
            md.append(f"| {op}{form} | {ci.text()} | {diff_txt} | {word} | {tp.text(1)} | "
                      f"{seen:,.0f} | {len(rs)} |")
        for r in rows:
            if str(r.get("sample_num")) == str(n) and r not in ok:  # not run, failed, stopped
                md.append(f"| {r.get('op')} (seed {r.get('seed')}) | {r.get('status')} | | | | | |")
        md.append("")
    md += _anytime_section(ok, ns, vhead)
    md += _cost_section(rows)
    md += _selection_section(out / "selection.json")
    (out / "results.md").write_text("\n".join(md))
    paths = {"csv": out / "results.csv", "md": out / "results.md",
             "anytime_csv": out / "anytime.csv"}
    from raytopk.tune.plots import plot_anytime, plot_scaling

    paths.update(plot_scaling(ok, out, head))
    paths.update(plot_anytime(ok, out, vhead, ns, _by, _mean_curve))
    return paths


def _anytime_section(ok: list[dict[str, Any]], ns: list[int], vhead: str) -> list[str]:
    md = [
        "## Anytime: training seconds to reach X% of the best final validation recall",
        "",
        f"Per sample_num, the target is X% of the best operator's mean final {vhead}; each "
        "entry is the mean training seconds (over seeds) at the first evaluation point where "
        "the operator's mean validation recall reaches it ('-': never within the budget).",
        "",
        "| sample_num | op | " + " | ".join(f"{int(f * 100)}%" for f in FRACTIONS) + " |",
        "|---:|---|" + "---:|" * len(FRACTIONS),
    ]
    for n in ns:
        curves = {op: _mean_curve(rs, vhead, "train_seconds") for op, rs in _by(ok, n).items()}
        curves = {op: c for op, c in curves.items() if c}
        if not curves:
            continue
        best = max(c[-1][1].mean for c in curves.values())
        for op, c in sorted(curves.items()):
            xy = [(x, ci.mean) for x, ci in c]
            cells = []
            for f in FRACTIONS:
                t = time_to_fraction(xy, f * best)
                cells.append("-" if t is None else f"{t:.1f}")
            md.append(f"| {n} | {op} | " + " | ".join(cells) + " |")
    return [*md, ""]


def _cost_section(rows: list[dict[str, Any]]) -> list[str]:
    done = [r for r in rows if r.get("wall_seconds") not in ("", None)]
    if not done:
        return []

    def mean(key: str) -> float:
        return sum(float(r.get(key) or 0) for r in done) / len(done)

    return [
        "## Cost per trial",
        "",
        f"{len(done)} trial(s): training {mean('train_seconds'):.1f} s (the budget), "
        f"evaluation {mean('eval_seconds'):.1f} s (anytime points + test day), overhead "
        f"{mean('overhead_seconds'):.1f} s (start-up, data warm-up, day boundaries, "
        f"checkpoints), wall {mean('wall_seconds'):.1f} s on average; "
        f"{sum(float(r.get('wall_seconds') or 0) for r in done) / 60:.1f} trial-minutes in all.",
        "",
    ]


def _selection_section(path: Path) -> list[str]:
    if not path.is_file():
        return ["## Parameter selection", "", "None: study.select was false (each operator's "
                "study.op_params or paper default).", ""]
    doc = json.loads(path.read_text())
    md = [
        "## Parameter selection (validation day, never the test day)",
        "",
        f"Chosen by {doc['metric']} at the budget; grids: "
        + "; ".join(f"{op} {vals}" for op, vals in doc["grid"].items() if vals),
        "",
        "| op | sample_num | chosen value | chosen lr | mean validation score (seeds) |",
        "|---|---:|---:|---:|---:|",
    ]
    for op, d in doc["chosen"].items():
        for n, c in d.items():
            c = c if isinstance(c, dict) else {"value": c}  # studies before the lr search
            v, lr = c.get("value"), c.get("lr")
            score = f"{c['score']:.4f} ({c.get('seeds')})" if "score" in c else ""
            md.append(f"| {op} | {n} | {'' if v is None else f'{v:g}'} | "
                      f"{'' if lr is None else f'{lr:g}'} | {score} |")
    md += ["", "Every selection trial:", "", "| trial | status | " + doc["metric"] + " |",
           "|---|---|---:|"]
    for t in doc["trials"]:
        v = t.get(doc["metric"])
        md.append(f"| {t.get('trial')} | {t.get('status')} | "
                  f"{'' if v is None else f'{float(v):.4f}'} |")
    return [*md, ""]
