"""The local-backend training config unit tests share (no Ray): conftest's session dataset
``tiny`` (2024-01-13..14 trained on, 2024-01-15 the test day), small batches, one CPU."""

from __future__ import annotations

from pathlib import Path

from raytopk.train.config import TrainConfig, load_config

DAYS = ["2024-01-13", "2024-01-14"]
TEST_DAY = "2024-01-15"


def local_config(data: Path, out: Path, *overrides: str) -> TrainConfig:
    """The shared base, then ``overrides`` (key=value; a later key wins)."""
    return load_config(
        None,
        [
            f"data.path={data}",
            f"data.train_days=[{DAYS[0]}..{DAYS[-1]}]",
            f"data.test_day={TEST_DAY}",
            "data.batch_size=32",
            "data.eval_batch_size=40",
            "data.sample_num=8",
            "scaling.use_gpu=false",
            "scaling.cpus_per_worker=1",
            "run.backend=local",
            f"run.output_dir={out}",
            *overrides,
        ],
    )
