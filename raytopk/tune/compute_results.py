"""The compute-matched study's comparison: test-day quality at equal steps and at equal compute,
the plateau check, and the same comparison for another device's step table.

Notation as in raytopk.tune.compute: S_N the slowest method's steps, steps(m, N) method m's, cut
fractions f; a final trial's anytime curve holds, per point, its step, the validation headline
and, at the cut points, the test headline (``test_<headline>``).

Written to the study's results directory:
- equal_compute.csv / equal_compute.md: per (N, comparison, f, method) the step it is read at,
  the compute that step costs on the table's device (step x t(m, N)), the test headline's mean
  and 95% t-interval over seeds, and the paired difference to the reference method (same seeds).
  comparison "steps": at step ⌊f·S_N⌋; "compute": at step ⌊f·steps(m, N)⌋ (compute f·T_N).
- plateau.json: per N, the best method at the end and the gain of its mean validation curve over
  the last quarter of its points (the study asks for < 0.01).
- anytime_steps.png / anytime_compute.png: mean validation curves per method, by step and by
  compute on the table's device.
- step_table.json: the table the budgets came from.

:func:`recut` gives another device's equal-compute comparison from the same runs: with that
device's t(m, N) the cut steps move, and the test day was evaluated only at this study's cut
points, so it reads the validation headline, interpolated linearly in steps between anytime
points (said so in its output).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

from raytopk.data import schema
from raytopk.metrics import headline_key
from raytopk.tune.compute import StepTable, load_step_table
from raytopk.tune.experiments import ROW_LOG, ran_to_result, read_log
from raytopk.tune.stats import paired_difference, t_interval

__all__ = ["comparison_rows", "curve_of", "cut_values", "plateau", "recut", "reported_finals",
           "value_at", "write_compute_reports"]

COLUMNS = ["N", "comparison", "fraction", "method", "step", "compute_s", "seeds", "mean",
           "low", "high", "diff_to_ref", "diff_low", "diff_high"]  # fmt: skip


def curve_of(r: dict[str, Any]) -> list[dict[str, Any]]:
    """A logged trial's anytime points (stored as a list, or as JSON text by Tune)."""
    c = r.get("anytime_curve") or []
    return json.loads(c) if isinstance(c, str) else list(c)


def value_at(curve: list[dict[str, Any]], key: str, step: float, interpolate: bool) -> float | None:
    """``key`` at ``step``: the point whose step is ``step`` (exact), or with ``interpolate``,
    linear between the points around it (None outside the curve)."""
    pts = sorted((int(p["steps"]), float(p[key])) for p in curve if key in p and "steps" in p)
    for s, v in pts:
        if s == step:
            return v
    if not interpolate:
        return None
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 < step < s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return None


def cut_values(
    rows: list[dict[str, Any]],
    table: StepTable,
    slowest_steps: dict[int, int],
    cuts: list[float],
    head: str,
    *,
    key_prefix: str = "test_",
    interpolate: bool = False,
) -> list[dict[str, Any]]:
    """Per (N, comparison, fraction) of the final ``rows``: the step each method is read at
    (``steps``: {method: step}) and its value per seed (``values``: {method: {seed: value}});
    comparison "steps" at ⌊f·S_N⌋, "compute" at ⌊f·steps(m, N)⌋ (module docstring)."""
    key = key_prefix + head
    ok = [r for r in rows if r.get("status") == "ok"]
    out = []
    for sample_num in sorted({int(r["sample_num"]) for r in ok}):
        n = schema.N_OWN + sample_num
        by_m: dict[str, list[dict[str, Any]]] = {}
        for r in ok:
            if int(r["sample_num"]) == sample_num:
                by_m.setdefault(str(r["op"]), []).append(r)
        methods = [m for m in by_m if (m, n) in table.seconds]
        if not methods:
            continue
        s_n = int(slowest_steps[sample_num])
        budget = table.budget(methods, n, s_n)
        for comparison in ("steps", "compute"):
            for f in cuts:
                vals: dict[str, dict[int, float]] = {}
                steps_of: dict[str, int] = {}
                for m in methods:
                    steps = s_n if comparison == "steps" else table.steps(m, n, budget)
                    step = max(1, int(f * steps + 1e-9))
                    steps_of[m] = step
                    for r in by_m[m]:
                        v = value_at(curve_of(r), key, step, interpolate)
                        if v is not None:
                            vals.setdefault(m, {})[int(r["seed"])] = v
                out.append({"N": n, "comparison": comparison, "fraction": f,
                            "methods": methods, "steps": steps_of, "values": vals})
    return out


def comparison_rows(
    rows: list[dict[str, Any]],
    table: StepTable,
    slowest_steps: dict[int, int],
    cuts: list[float],
    head: str,
    reference: str,
    *,
    key_prefix: str = "test_",
    interpolate: bool = False,
) -> list[dict[str, Any]]:
    """The equal-steps and equal-compute comparison of the final ``rows`` (module docstring)."""
    out = []
    for c in cut_values(rows, table, slowest_steps, cuts, head, key_prefix=key_prefix,
                        interpolate=interpolate):
        n, vals, ref = c["N"], c["values"], c["values"].get(reference, {})
        for m in c["methods"]:
            if m not in vals:
                continue
            iv = t_interval(list(vals[m].values()))
            d = paired_difference(vals[m], ref) if m != reference and ref else None
            out.append({
                "N": n, "comparison": c["comparison"], "fraction": c["fraction"], "method": m,
                "step": c["steps"][m],
                "compute_s": round(c["steps"][m] * table.t(m, n), 2),
                "seeds": iv.n, "mean": round(iv.mean, 4), "low": round(iv.low, 4),
                "high": round(iv.high, 4),
                "diff_to_ref": "" if d is None else round(d.mean, 4),
                "diff_low": "" if d is None else round(d.low, 4),
                "diff_high": "" if d is None else round(d.high, 4),
            })
    return out


def plateau(rows: list[dict[str, Any]], head: str) -> dict[int, dict[str, Any]]:
    """Per N: the method with the best mean final validation headline, and its mean curve's
    gain over the last quarter of its points (from the point at 3/4 of them to the end)."""
    key = "valid_" + head
    ok = [r for r in rows if r.get("status") == "ok"]
    out: dict[int, dict[str, Any]] = {}
    for sample_num in sorted({int(r["sample_num"]) for r in ok}):
        curves: dict[str, list[list[float]]] = {}
        for r in ok:
            if int(r["sample_num"]) == sample_num:
                c = [float(p[key]) for p in curve_of(r) if key in p]
                if c:
                    curves.setdefault(str(r["op"]), []).append(c)
        best, best_v, best_curve = None, -1.0, []
        for m, cs in curves.items():
            length = min(len(c) for c in cs)
            mean = [sum(c[i] for c in cs) / len(cs) for i in range(length)]
            if mean and mean[-1] > best_v:
                best, best_v, best_curve = m, mean[-1], mean
        if best is None:
            continue
        q = max(1, len(best_curve) // 4)
        gain = best_curve[-1] - best_curve[-1 - q] if len(best_curve) > q else float("nan")
        out[schema.N_OWN + sample_num] = {"method": best, "final_valid": round(best_v, 4),
                                "points": len(best_curve), "last_quarter_gain": round(gain, 4),
                                "plateaued": bool(gain < 0.01)}  # fmt: skip
    return out


def _markdown(comp: list[dict[str, Any]], table: StepTable, reference: str, note: str,
              source: str = "") -> str:
    md = [
        "# Equal steps and equal compute",
        "",
        f"Step times from {source or table.path} ({table.machine}, batch {table.batch_size}). "
        f"{note}",
        f"Paired differences are to {reference} (same seeds); an interval excluding 0 is a "
        "measured difference, otherwise none is claimed.",
        "",
    ]
    for n in sorted({r["N"] for r in comp}):
        for comparison in ("steps", "compute"):
            md += [f"## N = {n}, equal {comparison}", "",
                   "| f | method | step | compute (s) | seeds | mean [95% CI] | "
                   f"minus {reference} [95% CI] |", "|---:|---|---:|---:|---:|---|---|"]
            for r in comp:
                if r["N"] != n or r["comparison"] != comparison:
                    continue
                d = ("" if r["diff_to_ref"] == "" else
                     f"{r['diff_to_ref']:+.4f} [{r['diff_low']:+.4f}, {r['diff_high']:+.4f}]")
                md.append(f"| {r['fraction']:g} | {r['method']} | {r['step']} | "
                          f"{r['compute_s']:g} | {r['seeds']} | {r['mean']:.4f} "
                          f"[{r['low']:.4f}, {r['high']:.4f}] | {d} |")
            md.append("")
    return "\n".join(md)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _plots(rows: list[dict[str, Any]], table: StepTable, head: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "valid_" + head
    ok = [r for r in rows if r.get("status") == "ok"]
    ns = sorted({int(r["sample_num"]) for r in ok})
    if not ns:
        return
    methods = sorted({str(r["op"]) for r in ok})
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    for by, fname in (("steps", "anytime_steps.png"), ("compute", "anytime_compute.png")):
        fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4.2), squeeze=False)
        for ax, sample_num in zip(axes[0], ns):
            n = schema.N_OWN + sample_num
            for m in methods:
                cs = [curve_of(r) for r in ok
                      if int(r["sample_num"]) == sample_num and r["op"] == m]
                cs = [[p for p in c if key in p and "steps" in p] for c in cs]
                cs = [c for c in cs if c]
                if not cs or (m, n) not in table.seconds:
                    continue
                length = min(len(c) for c in cs)
                xs = [int(cs[0][i]["steps"]) for i in range(length)]
                if by == "compute":
                    xs = [x * table.t(m, n) for x in xs]
                ys = [sum(float(c[i][key]) for c in cs) / len(cs) for i in range(length)]
                ax.plot(xs, ys, "o-", ms=3, color=colour[m], label=f"{m} ({len(cs)} seeds)")
            ax.set_title(f"N = {n}")
            ax.set_xlabel("training steps" if by == "steps" else
                          f"compute (s on {table.machine})")
            ax.set_ylabel(f"validation {head} (mean over seeds)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def write_compute_reports(rows: list[dict[str, Any]], out: str | Path, study: Any,
                          base: Any) -> None:
    """equal_compute.csv/.md, plateau.json, the two anytime plots, the step table used, and
    claims.md/.json (raytopk.tune.claims, this study's N only)."""
    out = Path(out)
    table = load_step_table(study.step_table)
    head = headline_key(len(base.model.stages))
    comp = comparison_rows(rows, table, study.slowest_steps, study.compute_cuts, head,
                           study.reference_op)
    _write_csv(out / "equal_compute.csv", comp)
    note = ("Read on the test day at each method's cut steps (evaluated there during training).")
    _write(out / "equal_compute.md", _markdown(comp, table, study.reference_op, note,
                                               "step_table.json (beside this file)"))
    _write(out / "plateau.json", json.dumps(plateau(rows, head), indent=2) + "\n")
    if Path(study.step_table).resolve() != (out / "step_table.json").resolve():
        shutil.copyfile(study.step_table, out / "step_table.json")
    _plots(rows, table, head, out)
    from raytopk.tune.claims import Study, claims_rows, selected_digests, write_claims

    # Without the run log: this run's own window is logged only when it ends (study.run_study);
    # jobs/study_claims.py, run afterwards, reports the wall time. The rest as read_studies
    # reads it, so the two claims.md agree.
    write_claims(claims_rows([Study(str(out), rows, table, dict(study.slowest_steps), head,
                                    study.reference_op, tuple(read_log(out / ROW_LOG)),
                                    base_lr=base.optim.lr,
                                    selected=selected_digests(out / "selection.json"))]), out)


def reported_finals(rows: list[dict[str, Any]], results_csv: Path) -> list[dict[str, Any]]:
    """The final rows of a row log that the study reported: the trials results.csv lists (the
    log can also hold final trials of a setting the selection later moved away from), the last
    logged row of each that ran to a result. Without results.csv: every final trial."""
    last: dict[str, dict[str, Any]] = {}
    for r in rows:  # as the study's row log is read: a failed trial was run again
        if r.get("phase") == "final" and ran_to_result(r):
            last[str(r["trial"])] = r
    if not results_csv.is_file():
        return list(last.values())
    with results_csv.open(newline="") as f:
        names = {row["trial"] for row in csv.DictReader(f)}
    return [r for t, r in last.items() if t in names]


def recut(results_dir: str | Path, step_table: str | Path, out: str | Path) -> list[dict]:
    """Another device's equal-compute comparison from a finished study's reported final trials
    (trials.jsonl, :func:`reported_finals`) and that device's step table: the validation
    headline, interpolated between anytime points. ``out`` must not be ``results_dir``."""
    import yaml

    results_dir, out = Path(results_dir), Path(out)
    if out.resolve() == results_dir.resolve():
        raise ValueError(f"recut: out {str(out)!r} is the study's results directory; its "
                         "equal_compute files are the study's own: write elsewhere")
    doc = yaml.safe_load((results_dir / "study.yaml").read_text())
    study, stages = doc["study"], len(doc["train"]["model"]["stages"])
    rows = reported_finals(read_log(results_dir / ROW_LOG), results_dir / "results.csv")
    table = load_step_table(step_table)
    head = headline_key(stages)
    slowest = {int(k): int(v) for k, v in study["slowest_steps"].items()}
    comp = comparison_rows(rows, table, slowest, list(study["compute_cuts"]), head,
                           study["reference_op"], key_prefix="valid_", interpolate=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "equal_compute.csv", comp)
    note = ("Recut for this table's device: the VALIDATION day's headline, interpolated "
            "linearly in steps between anytime points (the test day was evaluated only at the "
            "original study's cut points). A step beyond a trial's last point has no value.")
    _write(out / "equal_compute.md", _markdown(comp, table, study["reference_op"], note,
                                               str(step_table)))
    return comp
