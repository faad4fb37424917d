"""A finished compute-matched study's equal-compute comparison for another device: its step
table, the same runs (raytopk.tune.compute_results.recut). No training, no Ray.

    python jobs/bench_step.py --out /tmp/mine --parts table     # this device's step table
    python jobs/study_recut.py --results docs/studies/compute \\
        --step-table /tmp/mine/step_times.json --out /tmp/mine/recut

Quality per step does not depend on the device; how many steps a compute budget buys does. With
the other table the equal-compute cut steps move, and the test day was evaluated only at the
study's own cut points, so the recut reads the validation day's headline, interpolated in steps
between the anytime points (its equal_compute.md says so). A cut beyond a method's last point
has no value: the study ran each method for its steps under the study's own table.
Writes <out>/equal_compute.csv and <out>/equal_compute.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", required=True, help="the study's results directory")
    p.add_argument("--step-table", required=True, help="step_times.json of jobs/bench_step.py")
    p.add_argument("--out", required=True, help="where the recut comparison goes")
    args = p.parse_args(argv)

    from raytopk.tune.compute_results import recut

    res = Path(args.results)
    for name in ("study.yaml", "trials.jsonl", "results.csv"):
        if not (res / name).is_file():
            print(f"error: --results {args.results!r} has no {name} (a study's results "
                  "directory holds study.yaml, trials.jsonl and, once final trials are "
                  "reported, results.csv)", file=sys.stderr)
            return 2
    try:
        comp = recut(res, args.step_table, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((Path(args.out) / "equal_compute.md").read_text())
    print(f"{len(comp)} row(s); written to {args.out}/equal_compute.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
