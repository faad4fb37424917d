"""The paper's three claims, read from one or more compute-matched studies' final trials, per N
and side by side across N.

Notation as in raytopk.tune.compute (t(m, N), S_N, T_N, steps(m, N)); d = the reference method
(DFTopK); q(m, s) the headline of method m at seed s at a given step; the lead of d over m is
q(d, s) − q(m, s), paired by seed (same data order, negatives and initial weights).

- (a) d is best at every N: at the full equal steps (S_N each) and the full equal compute (T_N
  each), per method the paired difference m − d on the test day; d is "best alone" when every
  other method is measurably behind, "tied for best" when none is measurably ahead but some are
  level, "not best" when one is measurably ahead, "undecided" when a method has no interval
  (an interval excluding 0 is a measured difference).
- (b) d processes more samples at equal compute: steps(d, N) / steps(m, N) at T_N, i.e.
  t(m, N) / t(d, N), from the study's step table, and (``tables``) its range over other
  measurements of the table; "more" only when that ratio exceeds 1 under every table given.
- (c) the extra samples turn into better recall: where steps(d, N) > steps(m, N), d's gain from
  steps(m, N) to steps(d, N), paired by seed, which is also the change of d's lead over m from
  equal samples (both at steps(m, N)) to equal compute; (c) predicts it positive, and it is a
  test of (c) only where (b) holds. Read on the validation day, d's curve interpolated between
  its anytime points: the test day was evaluated only at the cut points. Beside it, on the test
  day, d's own gain from S_N to steps(d, N).

:func:`selection_horizon` reads a finished selection's trials at fractions of their steps: the
setting it would have chosen had each trial stopped there, and what that gives up at the end.

:func:`claims_rows` computes it from final rows; :func:`read_studies` reads results
directories; :func:`claims_markdown` writes it up. ``jobs/study_claims.py`` is the command.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytopk.data import schema
from raytopk.metrics import headline_key
from raytopk.train.anytime import valid_metric
from raytopk.tune.compute import StepTable, load_step_table
from raytopk.tune.compute_results import curve_of, cut_values, reported_finals, value_at
from raytopk.tune.experiments import ROW_LOG, RUN_LOG, read_log
from raytopk.tune.selection import _num, _scores, _settings, choose_joint, latest_rows, op_param
from raytopk.tune.stats import Interval, paired_difference, t_interval

__all__ = ["Study", "claims_rows", "claims_markdown", "compute_spent", "diagnostics",
           "read_studies", "selected_digests", "selection_horizon", "verdict_a", "wall_time",
           "write_claims"]


@dataclass(frozen=True)
class Study:
    """One results directory's reported final rows and what reading them needs."""

    source: str
    rows: list[dict[str, Any]]  # the reported final trials ([] while the study runs)
    table: StepTable | None  # None before the study wrote its step_table.json
    slowest_steps: dict[int, int]
    head: str
    reference: str
    log: tuple[dict[str, Any], ...] = ()  # every row of the row log, for the compute spent
    runs: tuple[dict[str, Any], ...] = ()  # the run log: each run's wall-clock window
    base_lr: float | None = None  # train.optim.lr: the selection's tie-break toward it
    # The config digests of the selection trials selection.json lists (the rows the study chose
    # from); None where it lists none (no file yet, or one written before it recorded them).
    selected: frozenset[str] | None = None


def read_studies(dirs: list[str | Path]) -> list[Study]:
    """Each directory's study.yaml, step_table.json, and final trials that results.csv reports
    (raytopk.tune.compute_results.reported_finals). A study still in its first phase (no
    results.csv yet) is read with no final trials: its compute spent and wall time so far are
    reported. ValueError naming the directory and file when one is missing (study.yaml; the
    step table beside a results.csv), or when two directories report the same N."""
    import yaml

    out: list[Study] = []
    seen: dict[int, str] = {}
    for d in map(Path, dirs):
        running = not (d / "results.csv").is_file()  # no final trials reported yet
        for name in ("study.yaml",) if running else ("study.yaml", "step_table.json"):
            if not (d / name).is_file():
                raise ValueError(f"claims: {str(d)!r} has no {name} (a compute-matched study's "
                                 "results directory holds study.yaml, step_table.json, "
                                 f"{ROW_LOG} and, once final trials are reported, results.csv)")
        where = str(d / "study.yaml")
        try:
            doc = yaml.safe_load((d / "study.yaml").read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"claims: {where!r} is not YAML: {e}") from e
        study = (doc or {}).get("study") if isinstance(doc, dict) else None
        stages = ((doc or {}).get("train") or {}).get("model", {}).get("stages") \
            if isinstance(doc, dict) else None
        if not isinstance(study, dict) or not stages:
            raise ValueError(f"claims: {where!r} has no study section or no "
                             "train.model.stages (not a study's resolved config)")
        for key in ("slowest_steps", "reference_op"):
            if key not in study:
                raise ValueError(f"claims: {where!r} has no study.{key} (not a "
                                 "compute-matched study)")
        if not running:
            with (d / "results.csv").open(newline="") as f:
                if "trial" not in (csv.DictReader(f).fieldnames or []):
                    raise ValueError(f"claims: {str(d / 'results.csv')!r} has no 'trial' column")
        log = read_log(d / ROW_LOG)
        rows = [] if running else reported_finals(log, d / "results.csv")
        slowest = {int(k): int(v) for k, v in study["slowest_steps"].items()}
        lacking = sorted({int(r["sample_num"]) for r in rows} - set(slowest))
        if lacking:
            raise ValueError(f"claims: {where!r} study.slowest_steps has no entry for "
                             f"sample_num {lacking}, which {ROW_LOG}'s final trials use")
        for n in sorted({schema.N_OWN + int(r["sample_num"]) for r in rows}):
            if n in seen:
                raise ValueError(f"claims: N = {n} is reported by both {seen[n]!r} and "
                                 f"{str(d)!r}; give each N once")
            seen[n] = str(d)
        table = load_step_table(d / "step_table.json") if not running else None
        out.append(Study(str(d), rows, table,
                         slowest, headline_key(len(stages)),
                         str(study["reference_op"]), tuple(log),
                         tuple(read_log(d / RUN_LOG)),
                         _num((doc.get("train") or {}).get("optim") or {}, "lr"),
                         None if running else selected_digests(d / "selection.json")))
    return out


def selected_digests(path: Path) -> frozenset[str] | None:
    """The config digests of the trials a study's selection.json lists (a trial listed without
    one is left out), or None when the file is absent or records none (one written before
    selection.json recorded them). ValueError naming the file when it is not a selection file."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        trials = doc["trials"] if isinstance(doc, dict) else None
        if not isinstance(trials, list):
            raise ValueError("no list under 'trials'")
        digests = frozenset(str(t["config_digest"]) for t in trials
                            if isinstance(t, dict) and t.get("config_digest"))
    except (ValueError, KeyError) as e:
        raise ValueError(f"claims: {str(path)!r} is not a study's selection file ({e})") from e
    return digests or None


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
        return "tied for best: none measurably ahead (level with " + ", ".join(level) + ")"
    return "best alone" if signs else "no other method"


def _claim_b(table: StepTable, others: list[StepTable], m: str, ref: str, n: int,
             steps: dict[str, int]) -> dict[str, Any]:
    """(b) for m: the sample ratio at T_N, and t(m) / t(ref) in the study's and other tables."""
    t_ratio = table.t(m, n) / table.t(ref, n)
    more = [tb.t(m, n) / tb.t(ref, n) for tb in others
            if (m, n) in tb.seconds and (ref, n) in tb.seconds]
    every = [t_ratio, *more]
    return {"sample_ratio": round(steps[ref] / steps[m], 3), "step_time_ratio": round(t_ratio, 3),
            "other_tables": [round(x, 3) for x in more],
            "tables_without_row": len(others) - len(more),
            "range": [round(min(every), 3), round(max(every), 3)], "more": min(every) > 1.0}


def _valid_at(rows: list[dict[str, Any]], op: str, sample_num: int, key: str,
              step: int) -> dict[int, float]:
    """{seed: the validation headline at ``step``}, interpolated between anytime points."""
    out = {}
    for r in rows:
        if r.get("status") == "ok" and r["op"] == op and int(r["sample_num"]) == sample_num:
            v = value_at(curve_of(r), key, step, True)
            if v is not None:
                out[int(r["seed"])] = v
    return out


def _claim_c(st: Study, m: str, ref: str, n: int, steps: dict[str, int],
             b_holds: bool) -> dict[str, Any]:
    """(c) for m, on the validation day (the test day was evaluated only at the cut points):
    ref's lead over m at equal samples (both at steps(m, N)) and at equal compute (ref at
    steps(ref, N)), and ref's own gain from steps(m, N) to steps(ref, N), paired by seed."""
    key, sn = "valid_" + st.head, n - schema.N_OWN
    if steps[ref] <= steps[m]:
        return {"applies": False, "why": f"{ref} trains no more steps than {m} at T_N"}
    d_m = _valid_at(st.rows, ref, sn, key, steps[m])
    d_d = _valid_at(st.rows, ref, sn, key, steps[ref])
    m_m = _valid_at(st.rows, m, sn, key, steps[m])
    gain = paired_difference(d_d, d_m)
    out = {"applies": b_holds, "lead_equal_samples": _iv(paired_difference(d_m, m_m)),
           "lead_equal_compute": _iv(paired_difference(d_d, m_m)), "gain": _iv(gain)}
    if not b_holds:
        out["why"] = "(b) does not hold under every table"
    return out


def claims_rows(studies: list[Study], tables: list[StepTable] | None = None) -> dict[str, Any]:
    """Per N: (a) the paired differences and verdicts at the full equal steps and equal compute;
    per method, (b) the sample ratio and (c) the change of the lead (module docstring)."""
    out: dict[str, Any] = {"per_n": []}
    for st in studies:
        ref = st.reference
        if st.table is None or not st.rows:  # still running: what it has spent so far
            logged: dict[str, int] = {}
            for r in st.log:
                if r.get("phase") and r.get("sample_num") not in (None, ""):
                    k = f"N = {schema.N_OWN + int(r['sample_num'])}, {r['phase']}"
                    logged[k] = logged.get(k, 0) + 1
            out.setdefault("in_progress", []).append({"source": st.source, "logged": logged})
            cuts = []
        else:
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
            has_ref = ref in methods
            for m in methods:
                q = {k: vals[k].get(m, {}) for k in ("steps", "compute")}
                mean = {k: _iv(t_interval(list(q[k].values()))) if q[k] else None
                        for k in q}
                row: dict[str, Any] = {"steps": at["compute"]["steps"][m], "test": mean}
                if m != ref and has_ref:
                    row["b"] = _claim_b(st.table, tables or [], m, ref, n,
                                        at["compute"]["steps"])
                    row["c"] = _claim_c(st, m, ref, n, at["compute"]["steps"], row["b"]["more"])
                entry["methods"][m] = row
            out["per_n"].append(entry)
        out.setdefault("compute_spent", []).extend(compute_spent(st.log))
        out.setdefault("diagnostics", []).extend(diagnostics(st.rows))
        if st.rows:  # the Ns whose selection is over: would a shorter one choose the same?
            out.setdefault("selection_horizon", []).extend(selection_horizon(
                st.log, st.head, base_lr=st.base_lr,
                sample_nums={int(r["sample_num"]) for r in st.rows}, digests=st.selected))
        if st.runs:
            out.setdefault("wall", []).append(wall_time(st.source, st.runs))
    out["per_n"].sort(key=lambda e: e["N"])
    return out


def compute_spent(log: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> list[dict]:
    """Per (N, phase, method) of a row log, every logged trial (stale and failed ones too): the
    trials, their full-trial equivalents (samples seen / the trial's own max_samples, which every
    trial of one (method, N) shares), and trial-hours: recorded (wall_seconds) where a trial has
    it; estimated for the others (ASHA-stopped trials record no time) as the timed trials' mean
    overhead_seconds plus their (wall − overhead) seconds per sample times the samples seen."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in log:
        if r.get("op") and r.get("phase") and r.get("sample_num") not in (None, ""):
            key = (schema.N_OWN + int(r["sample_num"]), str(r["phase"]), str(r["op"]))
            groups.setdefault(key, []).append(r)

    def num(r: dict[str, Any], k: str) -> float:
        v = r.get(k)
        return float(v) if v not in (None, "") else 0.0

    out = []
    for (n, phase, op), rs in sorted(groups.items()):
        full = [num(r, "max_samples") for r in rs if num(r, "max_samples") > 0]
        timed = [r for r in rs if r.get("wall_seconds") not in (None, "")]
        untimed = [r for r in rs if r.get("wall_seconds") in (None, "")]
        basis = [r for r in timed if num(r, "samples_seen") > 0]
        est = None
        if basis:
            over = sum(num(r, "overhead_seconds") for r in basis) / len(basis)
            per_sample = (sum(num(r, "wall_seconds") - num(r, "overhead_seconds") for r in basis)
                          / sum(num(r, "samples_seen") for r in basis))
            est = sum(over + per_sample * num(r, "samples_seen") for r in untimed)
        out.append({
            "N": n, "phase": phase, "method": op, "trials": len(rs),
            "full_trials": round(sum(num(r, "samples_seen") for r in rs) / max(full), 1)
            if full else None,
            "hours_recorded": round(sum(num(r, "wall_seconds") for r in timed) / 3600, 2),
            "hours_estimated": None if est is None or not untimed else round(est / 3600, 2),
            "untimed": len(untimed),
        })
    return out


HORIZONS = (0.125, 0.25, 0.375, 0.5)


def selection_horizon(log: list[dict[str, Any]] | tuple[dict[str, Any], ...], headline: str,
                      fractions: tuple[float, ...] = HORIZONS, base_lr: float | None = None,
                      sample_nums: set[int] | None = None,
                      digests: frozenset[str] | set[str] | None = None) -> list[dict[str, Any]]:
    """Per (N, method) of a row log's selection trials (those of ``sample_nums``, default all;
    with ``digests``, only the rows of those config digests: the ones the study chose from, so
    a row the log holds from another config of the study takes no part):
    would a selection that stopped every trial at a fraction f of its steps have chosen the
    setting the end chooses? The study's own rule (:func:`raytopk.tune.selection.choose_joint`:
    the best validation headline averaged over seeds, a setting every seed has preferred) is
    applied to the trials that ran to the end, read at the end and at f of their steps (their
    validation curve interpolated between its points; a seed whose curve does not reach back to
    f has no value there). Per f: the setting chosen there, the settings every seed has a value
    for, and how far behind the end's choice that setting is at the end (the end's mean minus
    its mean; 0 when it is the same). Settings ASHA stopped on every seed have no end and take no
    part: this reads only among the settings the selection kept."""
    key = valid_metric(headline)
    sel = [r for r in latest_rows([dict(r) for r in log if r.get("phase") == "select"])
           if r.get("op") and r.get("sample_num") not in (None, "")
           and (sample_nums is None or int(r["sample_num"]) in sample_nums)
           and (digests is None or r.get("config_digest") in digests)]
    ended = [r for r in sel if r.get("status") == "ok" and key in r]
    curves = []  # (row, its curve, its last step), parsed once for every fraction
    for r in ended:
        c = curve_of(r)
        curves.append((r, c, max((float(p["steps"]) for p in c if key in p and "steps" in p),
                                 default=0.0)))

    def label(op: str, c: dict[str, Any]) -> str:
        p = op_param(op)
        v = "" if c["value"] is None else f"{p[0] if p else 'value'} {c['value']:g}, "
        return f"{v}lr {c['lr']:g}"

    def at(f: float) -> list[dict[str, Any]]:
        rows = []
        for r, curve, last in curves:
            v = value_at(curve, key, f * last, True) if last else None
            if v is not None:
                rows.append({**r, key: v})
        return rows

    end = choose_joint(ended, headline, base_lr)
    early = {f: choose_joint(at(f), headline, base_lr) for f in fractions}
    groups = _settings(sel)  # {(op, sample_num): (seeds, {(value, lr): {seed: row}})}
    out = []
    for (op, n), c in sorted(end.items()):
        seeds, by = groups[(op, n)]
        scores = {s: v for s, runs in by.items() if (v := _scores(runs, key))}
        if len(scores) < 2:  # one setting ran to the end: nothing to choose between
            continue
        entry: dict[str, Any] = {"N": schema.N_OWN + n, "method": op, "seeds": len(seeds),
                                 "settings": sum(len(v) >= len(seeds) for v in scores.values()),
                                 "chosen": label(op, c), "chosen_value": round(c["score"], 4),
                                 "at": []}
        for f in fractions:
            pick = early[f].get((op, n))
            if pick is None:
                entry["at"].append({"fraction": f, "setting": None, "behind": None})
                continue
            mine = scores[(pick["value"], pick["lr"])]
            entry["at"].append({"fraction": f, "setting": label(op, pick),
                                "same": (pick["value"], pick["lr"]) == (c["value"], c["lr"]),
                                "behind": round(c["score"] - sum(mine) / len(mine), 4)})
        out.append(entry)
    return sorted(out, key=lambda e: (e["N"], e["method"]))


DIAGNOSTICS = ("psum_over_k", "boundary_grad_share", "score_std_over_tau")


def diagnostics(rows: list[dict[str, Any]], op: str = "dftopk") -> list[dict[str, Any]]:
    """Per N, ``op``'s diagnostics in its reported final trials (raytopk/train/diagnostics.py:
    Σp/k per stage, the share of the score gradient on the two boundary slots, score std / τ),
    averaged over seeds and stages at its first, middle and last anytime points."""
    out = []
    ok = [r for r in rows if r.get("status") == "ok" and r["op"] == op]
    for sample_num in sorted({int(r["sample_num"]) for r in ok}):
        at_n = [r for r in ok if int(r["sample_num"]) == sample_num]
        curves = [[p for p in curve_of(r) if any(k.startswith("diag_") for k in p)]
                  for r in at_n]
        curves = [c for c in curves if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        params = sorted({str(r.get("op_params", "")) for r in at_n})
        entry: dict[str, Any] = {"N": schema.N_OWN + sample_num, "method": op,
                                 "params": params, "seeds": len(curves), "points": []}
        for i in sorted({0, (length - 1) // 2, length - 1}):
            point: dict[str, Any] = {"steps": int(curves[0][i]["steps"])}
            for d in DIAGNOSTICS:
                vals = [float(c[i][k]) for c in curves for k in c[i] if k.startswith(f"diag_{d}")]
                point[d] = round(sum(vals) / len(vals), 3) if vals else None
            entry["points"].append(point)
        out.append(entry)
    return out


def wall_time(source: str, runs: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> dict:
    """A study's elapsed wall time: the sum of its runs' windows (the run log), per N the runs
    covered. ValueError naming the row when a time is missing, unreadable, or mixes a time
    zone with none, or when a run ends before it starts; windows that overlap are counted
    once and reported."""
    import datetime

    spans = []
    for r in runs:
        try:
            a = datetime.datetime.fromisoformat(str(r["started"]))
            b = datetime.datetime.fromisoformat(str(r["ended"]))
            if b < a:
                raise ValueError("it ends before it starts")
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"claims: {source!r} run log: a row without a valid started/ended "
                             f"time ({e}): {r}") from e
        spans.append((a, b, ", ".join(str(schema.N_OWN + int(n))
                                       for n in r.get("sample_nums", [])) or "?"))
    try:
        spans.sort(key=lambda x: x[0])
    except TypeError as e:
        raise ValueError(f"claims: {source!r} run log mixes times with and without a time "
                         f"zone ({e})") from e
    per: dict[str, float] = {}
    overlaps, end = 0, None
    for a, b, key in spans:
        if end is not None and a < end:
            overlaps += 1
            a = min(end, b)
        per[key] = per.get(key, 0.0) + (b - a).total_seconds() / 3600
        end = b if end is None else max(end, b)
    return {"source": source, "runs": len(runs), "hours": round(sum(per.values()), 2),
            "hours_by_n": {k: round(v, 2) for k, v in per.items()}, "overlapping": overlaps,
            "backfilled": sum(1 for r in runs if r.get("source"))}


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
    for p in c.get("in_progress") or []:
        rows = ", ".join(f"{k}: {v}" for k, v in sorted(p["logged"].items())) or "none"
        md += [f"In progress, no final trials reported yet: {p['source']} (trials logged: "
               f"{rows}); its compute and wall time so far are below.", ""]
    ref = per_n[0]["reference"] if per_n else "dftopk"
    md += ["", f"## (a) {ref} reaches the best recall", "",
           f"Per method m: m − {ref}, paired by seed, at the full equal steps (S_N each) and the "
           f"full equal compute (T_N each); last, {ref}'s own value and the verdict.", "",
           "| N | method | equal steps: m − ref | equal compute: m − ref |", "|---:|---|---|---|"]
    for e in per_n:
        for m, d in e["a"]["compute"]["diffs"].items():
            md.append(f"| {e['N']} | {m} | {_fmt(e['a']['steps']['diffs'].get(m))} | "
                      f"{_fmt(d)} |")
        own = (e["methods"].get(ref) or {}).get("test") or {}
        md.append(f"| {e['N']} | **{ref}** | {_fmt(own.get('steps'), False)}: "
                  f"{e['a']['steps']['verdict']} | {_fmt(own.get('compute'), False)}: "
                  f"{e['a']['compute']['verdict']} |")
    md += ["", f"## (b) {ref} processes more samples at equal compute", "",
           f"steps({ref}) / steps(m) at T_N = t(m) / t({ref}) in the study's table, the same "
           "ratio in the other tables given (repeated measurements), and the range over all; "
           "\"more\" only where the ratio exceeds 1 in every table.", "",
           f"| N | method | steps(m) | samples {ref} / m | other tables | range | more? |",
           "|---:|---|---:|---:|---|---|---|"]
    for e in per_n:
        for m, v in e["methods"].items():
            if "b" not in v:
                continue
            b = v["b"]
            other = ", ".join(f"{x:g}" for x in b["other_tables"]) or "–"
            if b.get("tables_without_row"):
                other += f" ({b['tables_without_row']} without this row)"
            md.append(f"| {e['N']} | {m} | {v['steps']} | {b['sample_ratio']:g} | {other} | "
                      f"{b['range'][0]:g}–{b['range'][1]:g} | {'yes' if b['more'] else 'no'} |")
    md += ["", "## (c) the extra samples turn into better recall", "",
           f"Read on the validation day's headline: the test day was evaluated only at the cut "
           f"points, not at every method's step count. Per method m: {ref}'s lead over m "
           f"(ref − m, paired by seed) at equal samples (both at steps(m), {ref}'s curve "
           f"interpolated linearly between its anytime points) and at equal compute ({ref} at "
           f"its own steps), and {ref}'s gain from steps(m) to its own steps, i.e. what its extra "
           "samples bought (the lead's change). (c) is tested only where (b) holds; the "
           "validation day also chose each method's setting, on 2 of these seeds.", "",
           "| N | method | samples ref / m | lead, equal samples | lead, equal compute | "
           f"{ref}'s gain from the extra samples |", "|---:|---|---:|---|---|---|"]
    for e in per_n:
        for m, v in e["methods"].items():
            cc = v.get("c")
            if cc is None:
                continue
            if "gain" not in cc:
                md.append(f"| {e['N']} | {m} | {v['b']['sample_ratio']:g} | – | – | "
                          f"not tested: {cc['why']} |")
                continue
            gain = _fmt(cc["gain"]) + ("" if cc["applies"] else f" (not a test: {cc['why']})")
            md.append(f"| {e['N']} | {m} | {v['b']['sample_ratio']:g} | "
                      f"{_fmt(cc['lead_equal_samples'])} | {_fmt(cc['lead_equal_compute'])} | "
                      f"{gain} |")
    md += ["", f"On the test day, {ref}'s gain from S_N steps (the slowest method's) to its "
           "steps at T_N, paired by seed:", "",
           f"| N | steps | {ref} at S_N | {ref} at T_N | gain |", "|---:|---|---|---|---|"]
    for e in per_n:
        r = e["methods"].get(ref)
        if r is None:
            continue
        md.append(f"| {e['N']} | {e['slowest_steps']} → {r['steps']} | "
                  f"{_fmt(r['test']['steps'], False)} | {_fmt(r['test']['compute'], False)} | "
                  f"{_fmt(e.get('reference_gain'))} |")
    diags = c.get("diagnostics") or []
    if diags:
        md += ["", f"## {ref}'s diagnostics", "",
               "In its reported final trials, averaged over seeds and both stages, at the first, "
               "middle and last anytime points: Σp/k (the soft membership's sum over k; 1 when it "
               "selects exactly k), the share of the score gradient's squared norm on the two "
               "boundary slots (k-th and (k+1)-th), and the score spread over τ.", "",
               "| N | setting | seeds | step | Σp/k | boundary share | score std / τ |",
               "|---:|---|---:|---:|---:|---:|---:|"]
        for e in diags:
            for pt in e["points"]:
                md.append(f"| {e['N']} | {', '.join(e['params'])} | {e['seeds']} | "
                          f"{pt['steps']} | {pt['psum_over_k']} | {pt['boundary_grad_share']} | "
                          f"{pt['score_std_over_tau']} |")
    horizon = c.get("selection_horizon") or []
    if horizon:
        fr = [p["fraction"] for p in horizon[0]["at"]]
        md += ["", "## Would a shorter selection choose the same setting?", "",
               "Per (N, method) whose selection is over: the study's choice rule (best "
               "validation-day headline averaged over the selection seeds, a setting every seed "
               "has preferred) applied to the selection trials that ran to the end, read at the "
               "end and at a fraction of their steps (each validation curve interpolated between "
               "its points). Per fraction: the setting it would choose and, in brackets, how far "
               "behind the end's choice that setting ends (\"same\": the end's choice). Settings: "
               "those every selection seed ran to the end. Settings ASHA stopped take no part, "
               "so this compares only among the settings the selection kept; a selection "
               "stopped at that fraction would train that share of these trials' steps. The gaps "
               "are means over the selection seeds, without an interval; –: no trial's curve "
               "reaches back that far.", "",
               "| N | method | settings | chosen at the end | " + " | ".join(
                   f"at {f:g} of the steps" for f in fr) + " |",
               "|---:|---|---:|---|" + "---|" * len(fr)]
        for e in horizon:
            cells = ["–" if p["setting"] is None else "same" if p["same"] else
                     f"{p['setting']} (−{p['behind']:.4f})" for p in e["at"]]
            md.append(f"| {e['N']} | {e['method']} | {e['settings']} | {e['chosen']} "
                      f"({e['chosen_value']:.4f}) | " + " | ".join(cells) + " |")
    spent = c.get("compute_spent") or []
    if spent:
        md += ["", "## Compute spent", "",
               "Every trial in the row logs (selection, finals, stale and failed ones too). Full "
               "trials: samples seen / one trial's samples. Trial-hours: the wall time recorded "
               "by the trials that have one; for the others (ASHA stopped them, or they failed "
               "before reporting it) estimated as the timed trials' mean start-up and overhead "
               "plus their wall seconds per sample. Each trial's own clock: trials ran side by "
               "side, so the hours are not elapsed time.", "",
               "| N | phase | method | trials | full trials | trial-hours: recorded + estimated |",
               "|---:|---|---|---:|---:|---|"]
        tot: dict[tuple[int, str], list[Any]] = {}
        for r in spent:
            est = r["hours_estimated"]
            h = f"{r['hours_recorded']:.2f}" + (
                "" if not r["untimed"] else
                f" + {est:.2f} ({r['untimed']} untimed)" if est is not None else
                f" + ? ({r['untimed']} untimed, no timed trial to estimate from)")
            full = "–" if r["full_trials"] is None else f"{r['full_trials']:g}"
            md.append(f"| {r['N']} | {r['phase']} | {r['method']} | {r['trials']} | {full} | "
                      f"{h} |")
            t = tot.setdefault((r["N"], r["phase"]), [0, 0.0, False])
            t[0] += r["trials"]
            t[1] += r["hours_recorded"] + (est or 0.0)
            t[2] = t[2] or (r["untimed"] > 0 and est is None)
        md += ["", "| N | phase | trials | trial-hours |", "|---:|---|---:|---:|"]
        md += [f"| {n} | {ph} | {int(t[0])} | {t[1]:.1f}{' + ?' if t[2] else ''} |"
               for (n, ph), t in sorted(tot.items())]
    walls = [w for w in c.get("wall") or [] if w["runs"]]
    if walls:
        md += ["", "Elapsed wall time, the sum of the study command's runs (their run log, "
               "runs.jsonl beside trials.jsonl; a run that dies without unwinding, e.g. "
               "killed, leaves no row):", "",
               "| study | runs | hours | by the N of the run |", "|---|---:|---:|---|"]
        for w in walls:
            by = ", ".join(f"N = {k}: {v:g} h" for k, v in w["hours_by_n"].items())
            note = f" ({w['backfilled']} backfilled from the runs' console logs)" \
                if w["backfilled"] else ""
            if w["overlapping"]:
                note += f" ({w['overlapping']} overlapping an earlier one, counted once)"
            md.append(f"| {w['source']} | {w['runs']}{note} | {w['hours']:g} | {by} |")
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
