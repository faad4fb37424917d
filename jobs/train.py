"""Train a cascade with a differentiable top-k operator on Ray (DESIGN.md, "How it is used").

    python jobs/train.py --config jobs/configs/quickstart.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/<name>.yaml

Without RAY_ADDRESS this starts an embedded local Ray bound to 127.0.0.1; inside ``ray job submit``
(RAY_ADDRESS set) it joins that cluster with a plain ``ray.init()``. The resolved config is
printed first; at the end a table of the test-day metrics beside the random-selection baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Importable from a checkout without installing (also inside a submitted job's working dir).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytopk.train.config import ConfigError, TrainConfig, dump_yaml, load_config  # noqa: E402

__all__ = ["main", "init_ray", "metrics_table"]


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (a submitted job), else start a local one on
    127.0.0.1 with no dashboard (nothing listens beyond this machine)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # never num_cpus here: the cluster's resources are what they are
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)


def metrics_table(m: dict) -> str:
    """Markdown table: each test metric beside what random selection scores on the same data."""
    rows = [
        ("joint_recall@10@20", "random_joint_recall@10@20"),
        ("retrieval_recall@10@30", "random_retrieval_recall@10@30"),
        ("prerank_recall@10@20", "random_joint_recall@10@20"),  # pre-rank alone: 20 of N too
        ("retrieval_ndcg@10", None),
        ("prerank_ndcg@10", None),
        ("retrieval_kendall_tau", None),
        ("prerank_kendall_tau", None),
    ]
    rows += [(k, "random_" + k) for k in sorted(m) if k.startswith("corpus_recall@")]
    out = ["| metric | this run | random selection |", "|---|---:|---:|"]
    for key, rand in rows:
        if key not in m:
            continue
        r = m.get(rand) if rand else None
        r_txt = f"{r:.4f}" if isinstance(r, float) else ("0.0000" if "tau" in key else "-")
        v = m[key]
        out.append(
            f"| {key} | {v:.4f} | {r_txt} |"
            if isinstance(v, float)
            else f"| {key} | {v} | {r_txt} |"
        )
    out.append(
        f"\n{int(m.get('samples_seen', 0)):,} training samples in "
        f"{float(m.get('train_seconds', 0)):.1f} s of training "
        f"({float(m.get('wall_seconds', 0)):.1f} s wall); outputs in {m.get('output_dir', '')}"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file in jobs/configs/")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. op.name=lapsum op.params.alpha=5")
    args = p.parse_args(argv)
    try:
        cfg: TrainConfig = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"# resolved config ({args.config})\n{dump_yaml(cfg)}", flush=True)

    from raytopk.train.checkpoint import CheckpointError
    from raytopk.train.driver import TrainingStopped, run

    t0 = time.perf_counter()
    init_ray()
    try:
        metrics = run(cfg)
    except (ValueError, FileNotFoundError, CheckpointError, TrainingStopped) as e:
        # Validation errors and a non-finite-loss stop name their cause; no traceback needed.
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"\n## {cfg.run.name}: {cfg.op.name} on test day {metrics.get('test_day')} "
        f"({time.perf_counter() - t0:.0f} s in all)\n"
    )
    print(metrics_table(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
