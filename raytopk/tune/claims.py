"""The paper's three claims, read from one or more compute-matched studies' final trials, per N
and side by side across N.

Notation as in raytopk.tune.compute (t(m, N), S_N, T_N, steps(m, N)); d = the reference method
(DFTopK); q(m, s) the test-day headline of method m at seed s at a cut point; the lead of d over
m is q(d, s) − q(m, s), paired by seed (same data order, negatives and initial weights).

- (a) d is best at every N: at the full equal steps (S_N each) and the full equal compute (T_N
  each), per method the paired difference m − d; d is "best alone" when every other method is
  measurably behind, "tied for best" when none is measurably ahead but some are level, "not
  best" when one is measurably ahead (an interval excluding 0 is a measured difference).
- (b) d processes more samples at equal compute: steps(d, N) / steps(m, N) at T_N, i.e.
  t(m, N) / t(d, N), from the study's step table, and (``tables``) its range over other
  measurements of the table; "more" only when that ratio exceeds 1 under every table given.
- (c) the extra samples turn into better recall: the change of d's lead over m from equal steps
  (both at S_N, the same samples) to equal compute (d at steps(d, N), m at steps(m, N)), paired
  by seed; (c) predicts the lead grows where steps(d, N) > steps(m, N). Beside it, d's own gain
  from S_N to steps(d, N) steps.

:func:`claims_rows` computes it from final rows; :func:`read_studies` reads results
directories; :func:`claims_markdown` writes it up. ``jobs/study_claims.py`` is the command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytopk.data import schema
from raytopk.metrics import headline_key
from raytopk.tune.compute import StepTable, load_step_table
from raytopk.tune.compute_results import cut_values, reported_finals
from raytopk.tune.experiments import ROW_LOG, read_log
from raytopk.tune.stats import Interval, paired_difference, t_interval

__all__ = ["Study", "claims_rows", "claims_markdown", "compute_spent", "read_studies",
           "verdict_a", "write_claims"]


@dataclass(frozen=True)
class Study:
    """One results directory's reported final rows and what reading them needs."""

    source: str
    rows: list[dict[str, Any]]  # the reported final trials
    table: StepTable
    slowest_steps: dict[int, int]
    head: str
    reference: str
    log: tuple[dict[str, Any], ...] = ()  # every row of the row log, for the compute spent


def read_studies(dirs: list[str | Path]) -> list[Study]:
    """Each directory's study.yaml, step_table.json, and final trials that results.csv reports
    (raytopk.tune.compute_results.reported_finals). ValueError naming the directory and file
    when one is missing, or when two directories report the same N."""
    import yaml

    out: list[Study] = []
    seen: dict[int, str] = {}
    for d in map(Path, dirs):
        for name in ("study.yaml", "step_table.json", ROW_LOG, "results.csv"):
            if not (d / name).is_file():
                raise ValueError(f"claims: {str(d)!r} has no {name} (a compute-matched study's "
                                 "results directory holds study.yaml, step_table.json, "
                                 f"{ROW_LOG} and, once final trials are reported, results.csv)")
        doc = yaml.safe_load((d / "study.yaml").read_text())
        study = doc.get("study") or {}
        for key in ("slowest_steps", "reference_op"):
            if key not in study:
                raise ValueError(f"claims: {str(d / 'study.yaml')!r} has no study.{key} (not a "
                                 "compute-matched study)")
        log = read_log(d / ROW_LOG)
        rows = reported_finals(log, d / "results.csv")
        for n in sorted({schema.N_OWN + int(r["sample_num"]) for r in rows}):
            if n in seen:
                raise ValueError(f"claims: N = {n} is reported by both {seen[n]!r} and "
                                 f"{str(d)!r}; give each N once")
            seen[n] = str(d)
        out.append(Study(str(d), rows, load_step_table(d / "step_table.json"),
                         {int(k): int(v) for k, v in study["slowest_steps"].items()},
                         headline_key(len(doc["train"]["model"]["stages"])),
                         str(study["reference_op"]), tuple(log)))
    return out


def _iv(i: Interval | None) -> dict[str, Any] | None:
    if i is None:
        return None
    return {"mean": round(i.mean, 4), "low": round(i.low, 4), "high": round(i.high, 4),
            "seeds": i.n}


def _sign(i: dict[str, Any] | None) -> int | None:
    """+1 / −1 where the interval excludes 0 (2+ seeds), 0 where it holds 0, None without one."""
    if i is None or i["seeds"] < 2:
        return None
    return 1 if i["low"] > 0 else -1 if i["high"] < 0 else 0


def verdict_a(diffs: dict[str, dict[str, Any] | None]) -> str:
    """(a) at one cut from the other methods' paired differences m − d (module docstring)."""
    signs = {m: _sign(i) for m, i in diffs.items()}
    ahead = sorted(m for m, s in signs.items() if s == 1)
    level = sorted(m for m, s in signs.items() if s == 0)
    open_ = sorted(m for m, s in signs.items() if s is None)
    if ahead:
        return "not best (measurably behind " + ", ".join(ahead) + ")"
    if open_:
        return "undecided (no interval for " + ", ".join(open_) + ")"
    if level:
        return "tied for best (level with " + ", ".join(level) + ")"
    return "best alone" if signs else "no other method"


def claims_rows(studies: list[Study], tables: list[StepTable] | None = None) -> dict[str, Any]:
    """Per N: (a) the paired differences and verdicts at the full equal steps and equal compute;
    per method, (b) the sample ratio and (c) the change of the lead (module docstring)."""
    out: dict[str, Any] = {"per_n": []}
    for st in studies:
        ref = st.reference
        cuts = cut_values(st.rows, st.table, st.slowest_steps, [1.0], st.head)
        for n in sorted({c["N"] for c in cuts}):
            at = {c["comparison"]: c for c in cuts if c["N"] == n}
            methods = at["compute"]["methods"]
            vals = {k: at[k]["values"] for k in ("steps", "compute")}
            entry: dict[str, Any] = {
                "N": n, "source": st.source, "reference": ref, "headline": st.head,
                "table": st.table.path, "machine": st.table.machine,
                "slowest_steps": st.slowest_steps[n - schema.N_OWN],
                "budget_s": round(st.table.budget(methods, n,
                                                  st.slowest_steps[n - schema.N_OWN]), 2),
                "steps": dict(at["compute"]["steps"]), "methods": {}, "a": {},
                "not_run": {str(r["op"]): str(r["status"]) for r in st.rows
                            if schema.N_OWN + int(r["sample_num"]) == n
                            and str(r.get("status", "")).startswith("does not fit")},
            }
            for k in ("steps", "compute"):
                diffs = {m: _iv(paired_difference(vals[k].get(m, {}), vals[k].get(ref, {})))
                         for m in methods if m != ref}
                entry["a"][k] = {"verdict": verdict_a(diffs) if ref in vals[k] else
                                 f"no {ref} trials", "diffs": diffs}
            if ref in vals["steps"] and ref in vals["compute"]:
                own = paired_difference(vals["compute"][ref], vals["steps"][ref])
                entry["reference_gain"] = _iv(own)  # d at steps(d, N) minus d at S_N
            for m in methods:
                q = {k: vals[k].get(m, {}) for k in ("steps", "compute")}
                mean = {k: _iv(t_interval(list(q[k].values()))) if q[k] else None
                        for k in q}
                row: dict[str, Any] = {"steps": at["compute"]["steps"][m], "test": mean}
                if m != ref:
                    t_ratio = st.table.t(m, n) / st.table.t(ref, n)
                    others = [tb.t(m, n) / tb.t(ref, n) for tb in tables or []
                              if (m, n) in tb.seconds and (ref, n) in tb.seconds]
                    row["b"] = {"sample_ratio": round(at["compute"]["steps"][ref]
                                                      / at["compute"]["steps"][m], 3),
                                "step_time_ratio": round(t_ratio, 3),
                                "other_tables": [round(x, 3) for x in others],
                                "more": min([t_ratio, *others]) > 1.0}
                    lead = {k: {s: vals[k][ref][s] - q[k][s] for s in q[k]
                                if s in vals[k].get(ref, {})} for k in q}
                    row["c"] = {
                        "lead_steps": _iv(t_interval(list(lead["steps"].values())))
                        if lead["steps"] else None,
                        "lead_compute": _iv(t_interval(list(lead["compute"].values())))
                        if lead["compute"] else None,
                        "change": _iv(paired_difference(lead["compute"], lead["steps"])),
                    }
                entry["methods"][m] = row
            out["per_n"].append(entry)
        out.setdefault("compute_spent", []).extend(compute_spent(st.log))
    out["per_n"].sort(key=lambda e: e["N"])
    return out


def compute_spent(log: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> list[dict]:
    """Per (N, phase, method) of a row log, every logged trial (stale and failed ones too): the
    trials, their full-trial equivalents (samples seen / the trial's own max_samples, which every
    trial of one (method, N) shares), and trial-hours: recorded by the trials that ran to the
    end (wall_seconds), estimated for those ASHA stopped (which record no time) at the same
    (method, N, phase)'s wall seconds per sample."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in log:
        if r.get("op") and r.get("phase") and r.get("sample_num") not in (None, ""):
            key = (schema.N_OWN + int(r["sample_num"]), str(r["phase"]), str(r["op"]))
            groups.setdefault(key, []).append(r)
    out = []
    for (n, phase, op), rs in sorted(groups.items()):
        full = [float(r["max_samples"]) for r in rs if r.get("max_samples")]
        timed = [r for r in rs if r.get("wall_seconds") not in (None, "")
                 and float(r.get("samples_seen") or 0) > 0]
        per_sample = (sum(float(r["wall_seconds"]) for r in timed)
                      / sum(float(r["samples_seen"]) for r in timed)) if timed else None
        seen = sum(float(r.get("samples_seen") or 0) for r in rs)
        untimed = [r for r in rs if r not in timed]
        est = (sum(float(r.get("samples_seen") or 0) for r in untimed) * per_sample
               if per_sample is not None else None)
        out.append({
            "N": n, "phase": phase, "method": op, "trials": len(rs),
            "full_trials": round(seen / max(full), 1) if full else None,
            "hours_recorded": round(sum(float(r["wall_seconds"]) for r in timed) / 3600, 2),
            "hours_estimated": None if est is None else round(est / 3600, 2),
            "untimed": len(untimed),
        })
    return out


def _fmt(i: dict[str, Any] | None, sign: bool = True) -> str:
    if i is None:
        return "–"
    f = "+.4f" if sign else ".4f"
    if i["seeds"] < 2:
        return f"{i['mean']:{f}} (1 seed)"
    return f"{i['mean']:{f}} [{i['low']:{f}}, {i['high']:{f}}]"


def claims_markdown(c: dict[str, Any], command: str = "") -> str:
    """The claims as markdown: one section per claim, one table row per (N, method)."""
    per_n = c["per_n"]
    md = ["# The paper's claims, per N", ""]
    if command:
        md += [f"Written by `{command}`.", ""]
    md += [
        "Test-day headline of each study's reported final trials; intervals are 95% t-intervals "
        "over the paired seeds (same data order, negatives and initial weights per seed); an "
        "interval excluding 0 is a measured difference, otherwise none is claimed. Samples are "
        "matched from the step table named per N, not from the trials' clocks.", "",
        "| N | study | step table (machine) | S_N | T_N (s) | seeds |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for e in per_n:
        seeds = max((v["test"]["compute"] or {}).get("seeds", 0) for v in e["methods"].values())
        md.append(f"| {e['N']} | {e['source']} | {e['table']} ({e['machine']}) | "
                  f"{e['slowest_steps']} | {e['budget_s']:g} | {seeds} |")
    md += [""] + [f"Not run at N = {e['N']}: {m}, {why}." for e in per_n
                  for m, why in sorted(e.get("not_run", {}).items())]
    ref = per_n[0]["reference"] if per_n else "dftopk"
    md += ["", f"## (a) {ref} reaches the best recall", "",
           f"Per method m: m − {ref}, paired by seed, at the full equal steps (S_N each) and the "
           "full equal compute (T_N each).", "",
           "| N | method | equal steps: m − ref | equal compute: m − ref |", "|---:|---|---|---|"]
    for e in per_n:
        for m, d in e["a"]["compute"]["diffs"].items():
            md.append(f"| {e['N']} | {m} | {_fmt(e['a']['steps']['diffs'].get(m))} | "
                      f"{_fmt(d)} |")
        md.append(f"| {e['N']} | **{ref}** | {e['a']['steps']['verdict']} | "
                  f"{e['a']['compute']['verdict']} |")
    md += ["", f"## (b) {ref} processes more samples at equal compute", "",
           f"steps({ref}) / steps(m) at T_N = t(m) / t({ref}) in the study's table; beside it "
           "the same ratio in the other tables given (repeated measurements).", "",
           f"| N | method | steps(m) | samples {ref} / m | other tables | "
           "more under every table? |",
           "|---:|---|---:|---:|---|---|"]
    for e in per_n:
        for m, v in e["methods"].items():
            if "b" not in v:
                continue
            b = v["b"]
            other = ", ".join(f"{x:g}" for x in b["other_tables"]) or "–"
            md.append(f"| {e['N']} | {m} | {v['steps']} | {b['sample_ratio']:g} | {other} | "
                      f"{'yes' if b['more'] else 'no'} |")
    md += ["", "## (c) the extra samples turn into better recall", "",
           f"{ref}'s lead over m (ref − m, paired by seed) at equal steps (the same samples) and "
           "at equal compute, and its change; (c) predicts the lead grows where the sample "
           "ratio exceeds 1. The change holds both methods' further training: it isolates "
           f"{ref}'s extra samples only against the slowest method (steps(m) = S_N), where it "
           f"equals {ref}'s own gain below.", "",
           "| N | method | samples ref / m | lead, equal steps | lead, equal compute | change |",
           "|---:|---|---:|---|---|---|"]
    for e in per_n:
        for m, v in e["methods"].items():
            if "c" not in v:
                continue
            md.append(f"| {e['N']} | {m} | {v['b']['sample_ratio']:g} | "
                      f"{_fmt(v['c']['lead_steps'])} | {_fmt(v['c']['lead_compute'])} | "
                      f"{_fmt(v['c']['change'])} |")
    md += ["", f"{ref}'s own gain from its extra steps: test headline at S_N steps and at its "
           "steps at T_N, and the paired difference.", "",
           f"| N | steps | {ref} at S_N | {ref} at T_N | gain |", "|---:|---|---|---|---|"]
    for e in per_n:
        r = e["methods"].get(ref)
        if r is None:
            continue
        md.append(f"| {e['N']} | {e['slowest_steps']} → {r['steps']} | "
                  f"{_fmt(r['test']['steps'], False)} | {_fmt(r['test']['compute'], False)} | "
                  f"{_fmt(e.get('reference_gain'))} |")
    spent = c.get("compute_spent") or []
    if spent:
        md += ["", "## Compute spent", "",
               "Every trial in the row logs (selection, finals, stale and failed ones too). Full "
               "trials: samples seen / one trial's samples. Trial-hours: recorded by the trials "
               "that ran to the end; for those ASHA stopped (no time recorded) estimated at the "
               "same (N, phase, method)'s wall seconds per sample. Wall time is each trial's own "
               "clock; trials ran side by side, so the hours are not elapsed time.", "",
               "| N | phase | method | trials | full trials | trial-hours (recorded + est.) |",
               "|---:|---|---|---:|---:|---|"]
        tot: dict[tuple[int, str], list[float]] = {}
        for r in spent:
            est = r["hours_estimated"]
            h = f"{r['hours_recorded']:.2f}" + (
                "" if not r["untimed"] else
                f" + {est:.2f} ({r['untimed']} stopped)" if est is not None else
                f" + ? ({r['untimed']} without a timed trial beside them)")
            full = "–" if r["full_trials"] is None else f"{r['full_trials']:g}"
            md.append(f"| {r['N']} | {r['phase']} | {r['method']} | {r['trials']} | {full} | "
                      f"{h} |")
            t = tot.setdefault((r["N"], r["phase"]), [0, 0.0])
            t[0] += r["trials"]
            t[1] += r["hours_recorded"] + (est or 0.0)
        md += ["", "| N | phase | trials | trial-hours |", "|---:|---|---:|---:|"]
        md += [f"| {n} | {ph} | {int(t[0])} | {t[1]:.1f} |" for (n, ph), t in sorted(tot.items())]
    md.append("")
    return "\n".join(md)


def write_claims(c: dict[str, Any], out: str | Path, command: str = "") -> None:
    """claims.json and claims.md into ``out`` (each written whole, then renamed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("claims.json", json.dumps(c, indent=2) + "\n"),
                       ("claims.md", claims_markdown(c, command))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
