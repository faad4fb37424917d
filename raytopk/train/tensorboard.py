"""TensorBoard event files of a training run: ``<run.output_dir>/tensorboard/``, written by the
progress log (raytopk.train.outputs.ProgressLog) as reports arrive, so a run can be watched live::

    tensorboard --logdir runs/            # pip install tensorboard (not a raytopk dependency)

Scalars, by report kind, against the global step: ``step/`` the loss parts, samples/s and data
wait; ``valid/`` the validation points (anytime curve); ``day/`` each day's mean loss and the
streaming evaluation; ``test/`` the final test-day metrics. Written with tensorboardX (a
dependency of Ray Tune); a resumed run adds a new events file to the same folder.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["TB_DIR", "EventLog"]

TB_DIR = "tensorboard"

# Report fields that are positions or bookkeeping, not curves.
_SKIP = {"rank", "epoch", "day_index", "num_days", "step", "global_step", "samples_seen",
         "train_seconds", "workers", "time", "eval_point", "starts", "num_parameters",
         "day_samples", "num_requests", "corpus_num_queries"}  # fmt: skip


class EventLog:
    """Scalars of each report (a flat dict with ``kind``) into ``<out_dir>/tensorboard``."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir) / TB_DIR
        self._writer: Any = None

    def _scalars(self, m: dict[str, Any]) -> dict[str, float]:
        kind = str(m.get("kind", ""))
        if kind not in ("step", "valid", "day", "final"):
            return {}
        prefix = "test" if kind == "final" else kind
        out = {}
        for k, v in m.items():
            if k in _SKIP or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if kind == "final" and not ("@" in k or k.endswith("tau")):
                continue  # the final report's run facts are not curves
            if math.isfinite(v):
                out[f"{prefix}/{k}"] = float(v)
        return out

    def write(self, m: dict[str, Any]) -> None:
        """Add report ``m``'s scalars at its global step (nothing for other kinds)."""
        scalars = self._scalars(m)
        if not scalars:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self.dir.mkdir(parents=True, exist_ok=True)
            # A unique suffix: two writers opened in one second must not share a file name.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._writer = SummaryWriter(str(self.dir), flush_secs=5, filename_suffix=suffix)
        step = int(m.get("global_step", 0))
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        if m.get("kind") in ("valid", "day", "final"):
            self._writer.flush()  # rare and worth seeing at once

    def __getstate__(self) -> dict[str, Any]:
        # Ray may pickle the progress log again after a restart; tensorboardX's writer holds a
        # multiprocessing queue that cannot be pickled: a copy opens its own writer when needed.
        return {**self.__dict__, "_writer": None}

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
