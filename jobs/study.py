"""The sample-scaling study on Ray Tune: parameter selection on a validation day, then every
operator × sample_num × seed at equal compute (raytopk.tune.study).

    python jobs/study.py --config jobs/configs/study_quick.yaml     # < 15 min, 2 cores
    python jobs/study.py --config jobs/configs/study_medium.yaml    # <= 2 h, 2 cores
    ray job submit --working-dir . -- python jobs/study.py --config jobs/configs/study.yaml
    python jobs/study.py --config jobs/configs/study_compute_1000.yaml --plan  # cost, no run

Overrides: ``study.<key>=value`` (e.g. study.budget_seconds=120 study.seeds=[1,2,3]
study.select=false) and ``train.<key>=value`` for every trial's training config (e.g.
train.data.batch_size=512). Re-running the same command with the same study.output_dir
continues the study; finished trials are not redone, a finished selection is reused. Outputs:
results.csv, results.md, anytime.csv, anytime.png, sample_scaling.png, selection.csv/.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytopk.ray_env import init_ray  # noqa: E402
from raytopk.train.config import ConfigError  # noqa: E402

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="study YAML in jobs/configs/")
    p.add_argument("overrides", nargs="*", help="study.key=value or train.key=value")
    p.add_argument("--plan", action="store_true",
                   help="print what a compute-matched study will run (steps, trials, compute) "
                   "and exit: no Ray, no training")
    args = p.parse_args(argv)

    from raytopk.tune.experiments import StudyInterrupted
    from raytopk.tune.study import load_study, results_path, run_study

    try:
        study, base = load_study(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        from raytopk.tune.compute import plan_markdown, study_plan
        from raytopk.tune.experiments import read_log, row_log

        try:
            print(plan_markdown(study_plan(study, base, read_log(row_log(study)))))
        except (ConfigError, ValueError, KeyError) as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        return 0
    t0 = time.perf_counter()
    init_ray()
    try:
        rows = run_study(study, base)
    except StudyInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = results_path(study)  # study.results_dir when set (the compute study's docs folder)
    print(f"\n{(out / 'results.md').read_text()}")
    bad = [r for r in rows if r.get("status") != "ok"]
    print(
        f"{len(rows)} trial(s), {len(rows) - len(bad)} ok, {len(bad)} not run or failed; "
        f"{time.perf_counter() - t0:.0f} s in all; outputs in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
