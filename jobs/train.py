"""Train a cascade with a differentiable top-k operator on Ray (docs/design.md, How it is
used).

    python jobs/train.py --config jobs/configs/quickstart.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/<name>.yaml

Without RAY_ADDRESS this starts an embedded local Ray (raytopk.ray_env.init_ray: token
authentication on); inside ``ray job submit`` (RAY_ADDRESS set) it joins that cluster with a plain
``ray.init()``. With ``run.backend=local`` it trains in this process and never imports Ray (a
machine without Ray, a notebook, a debugger). The resolved config is printed first; at the
end a table of the test-day metrics beside the random-selection baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Importable from a checkout without installing (also inside a submitted job's working dir).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytopk.train.config import ConfigError, TrainConfig, dump_yaml, load_config  # noqa: E402

__all__ = ["main"]


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
    from raytopk.train.outputs import metrics_table

    t0 = time.perf_counter()
    if cfg.run.backend == "ray":  # the local backend trains in this process: no Ray at all
        from raytopk.ray_env import init_ray

        init_ray()
    try:
        metrics = run(cfg)
    except (ValueError, FileNotFoundError, CheckpointError, TrainingStopped) as e:
        # Validation errors and a non-finite-loss stop name their cause; no traceback needed.
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"\n## {cfg.run.name}: {cfg.op.name} (loss form {cfg.loss.form}) on test day "
        f"{metrics.get('test_day')} "
        f"({time.perf_counter() - t0:.0f} s in all)\n"
    )
    print(metrics_table(metrics, len(cfg.model.stages)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
