"""The paper's claims (a)-(c) per N, from finished compute-matched studies' final trials, side
by side across N (raytopk.tune.claims). No training, no Ray.

    python jobs/study_claims.py --results docs/studies/compute docs/studies/compute_1000 \\
        --tables docs/bench/step/repeats/threads1.json docs/bench/step/repeats/threads2.json \\
        --out docs/studies

Each --results directory is one study's (study.yaml, step_table.json, trials.jsonl,
results.csv); each N must come from one of them. --tables: other measurements of the step
table, shown beside the study's sample ratios for (b). Writes <out>/claims.md and claims.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", nargs="+", required=True, help="studies' results directories")
    p.add_argument("--tables", nargs="*", default=[], help="other step_times.json to compare")
    p.add_argument("--out", required=True, help="where claims.md and claims.json go")
    args = p.parse_args(argv)

    from raytopk.tune.claims import claims_markdown, claims_rows, read_studies, write_claims
    from raytopk.tune.compute import load_step_table

    try:
        studies = read_studies(args.results)
        tables = [load_step_table(t) for t in args.tables]
        c = claims_rows(studies, tables)
    except (ValueError, KeyError) as e:  # a missing step-table row names the table
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not c["per_n"]:
        print(f"error: --results {args.results} hold no reported final trials", file=sys.stderr)
        return 1
    cmd = "python jobs/study_claims.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_claims(c, args.out, cmd)
    print(claims_markdown(c, cmd))
    print(f"written to {args.out}/claims.md and claims.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
