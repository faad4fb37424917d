"""Make a RecFlow-layout dataset, or convert one (real or synthetic) to the parquet training reads.

    python jobs/prepare_data.py synthetic --out data/synthetic/raw [--days 4]
        [--requests-per-day 1500] [--users 400] [--items 4000] [--seed 0]
        [--density default|recflow]
    python jobs/prepare_data.py convert --src data/recflow --out data/recflow_parquet
        [--days 2024-01-13 2024-01-14 ...] [--overwrite] [--strict]

convert converts every complete day; days missing a file are named in one message at the end
(stderr), and make the exit status non-zero only with --strict.

Layouts: docs/protocol.md §4.1 (raw) and raytopk/data/convert.py (converted); see data/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from raytopk.data.convert import convert, incomplete_message
from raytopk.data.synthetic import DENSITIES, P_SHORT_RANK, generate

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic", help="write a synthetic RecFlow release (raw layout)")
    s.add_argument("--out", required=True, help="raw RecFlow directory to create")
    s.add_argument("--days", type=int, default=4)
    s.add_argument("--requests-per-day", type=int, default=1500)
    s.add_argument("--users", type=int, default=400)
    s.add_argument("--items", type=int, default=4000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--density",
        choices=DENSITIES,
        default="default",
        help="stage sizes: 'default' (~35 logged items per request, what the quickstart uses) "
        "or 'recflow' (shaped like the real release: ~200 items per request; needs --items >= "
        "4900); rank_pos is the rank stage's top 10 in both",
    )
    s.add_argument(
        "--p-short-rank",
        type=float,
        default=P_SHORT_RANK,
        help="per request, probability that its rank stage saw fewer than 10 candidates "
        f"(rank_pos 4..9, no rank_neg; default {P_SHORT_RANK})",
    )
    s.add_argument(
        "--rank-pos-quirks",
        action="store_true",
        help="also drop 1%% of rank_pos items' all_stage rows and let the rank_pos key be "
        "missing/empty (quirks a real reader would not survive; for converter tests)",
    )
    c = sub.add_parser("convert", help="convert a RecFlow layout to the parquet dataset")
    c.add_argument("--src", required=True, help="raw RecFlow directory (all_stage/, ...)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument(
        "--days",
        nargs="+",
        default=None,
        help="days YYYY-MM-DD (space- or comma-separated; default: all found)",
    )
    c.add_argument("--overwrite", action="store_true", help="re-convert days already present")
    c.add_argument(
        "--strict",
        action="store_true",
        help="exit non-zero if a day lacks one of its files (default: convert the complete days, "
        "name the incomplete ones, exit 0)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.cmd == "synthetic":
        raw = generate(
            args.out,
            days=args.days,
            requests_per_day=args.requests_per_day,
            users=args.users,
            items=args.items,
            seed=args.seed,
            density=args.density,
            p_short_rank=args.p_short_rank,
            rank_pos_quirks=args.rank_pos_quirks,
        )
        dt = time.perf_counter() - t0
        n = args.days * args.requests_per_day
        print(
            f"wrote synthetic RecFlow ({args.density} density) to {raw}: {args.days} days, "
            f"{n} requests in {dt:.2f} s"
        )
        return {"out": str(raw), "days": args.days, "requests": n, "seconds": dt}
    days = None
    if args.days is not None:
        days = [d for arg in args.days for d in arg.split(",") if d]
    counts = convert(args.src, args.out, days=days, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    done = counts["days_converted"]
    n_done = sum(counts["per_day"][d]["requests"] for d in done)
    rate = n_done / dt if dt > 0 else float("inf")
    print(
        f"converted {len(done)} day(s) {done} ({n_done} requests) into {args.out} in {dt:.2f} s "
        f"({rate:,.0f} requests/s); skipped {counts['days_skipped']}"
    )
    print(
        json.dumps(
            {k: counts[k] for k in ("requests", "requests_per_day", "rank_pos_missing_rank_index")}
        )
    )
    if counts["days_incomplete"]:
        print(incomplete_message(args.src, counts["days_incomplete"]), file=sys.stderr)
        if args.strict:
            raise SystemExit(1)
    return {**counts, "seconds": dt}


if __name__ == "__main__":
    main(sys.argv[1:])
