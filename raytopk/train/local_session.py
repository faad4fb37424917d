"""The training loop in one process, without Ray (``run.backend: local``): a debugger, a notebook,
or a lone GPU.

``raytopk.train.loop.train_loop`` asks its session for five things; :class:`LocalSession` answers
them here: rank 0 of 1 on the chosen device (a GPU when there is one and ``scaling.use_gpu``
allows it), the model moved there (no DDP), the day's batches from
``raytopk.data.local_reader`` (the Ray pipeline's own transforms, so a 1-worker Ray run and a
local run see identical batches), and reports written to the run directory in the Ray backend's
format: progress.csv, the console line, ``checkpoints/<name>/`` and the record of the latest
checkpoint, so ``run.resume`` and ``raytopk.train.prepare`` work the same for both backends.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from raytopk.data.local_reader import iter_local_groups, prefetched
from raytopk.ray_env import SNAPSHOT
from raytopk.train.events import Report
from raytopk.train.outputs import ProgressLog
from raytopk.train.prepare import CHECKPOINTS, Prepared, latest_checkpoint, planned_samples

__all__ = ["LocalSession", "local_device"]


def local_device(use_gpu: bool | str) -> torch.device:
    """cuda:0 when there is a GPU and ``scaling.use_gpu`` is auto or true, else the CPU;
    ValueError when use_gpu=true finds none."""
    has = torch.cuda.is_available()
    if use_gpu is True and not has:
        raise ValueError("scaling.use_gpu=true but torch sees no CUDA device")
    return torch.device("cuda", 0) if has and use_gpu in (True, "auto") else torch.device("cpu")


class LocalSession:
    """One process, rank 0 of 1. ``datasets``: name -> ``raytopk.train.driver.DatasetSpec``."""

    rank, world = 0, 1

    def __init__(
        self,
        prep: Prepared,
        datasets: dict[str, Any],
        device: torch.device,
        verbose: bool,
        on_report: Callable[[Report], None] | None = None,
    ) -> None:
        self.prep, self.datasets, self.device = prep, datasets, device
        self.on_report = on_report
        self.out = prep.output_dir
        cfg = prep.cfg
        self.log = ProgressLog(
            self.out, cfg.run.name, len(cfg.model.stages), verbose, planned_samples(prep)
        )
        self.keep = cfg.run.keep_checkpoints

    def restored(self, load: Callable[[str], Any]) -> Any | None:
        ckpt = latest_checkpoint(self.out)
        return None if ckpt is None else load(str(ckpt))

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def dataset(self, key: str, batch_size: int, prefetch: int) -> Any:
        """A function opening an iterator over dataset ``key``'s batches, for
        ``raytopk.data.loader.CascadeBatches``."""
        spec = self.datasets[key]
        pin = self.device.type == "cuda"

        def open_batches() -> Any:
            groups = iter_local_groups(
                self.prep.cfg.data.path,
                spec.days,
                train=spec.train,
                sample_num=spec.sample_num,
                batch_size=batch_size,
                seed=spec.seed,
                max_requests=spec.max_requests,
            )
            return prefetched(groups, prefetch, pin=pin)

        return open_batches

    def report(
        self,
        report: Report,
        write_checkpoint: Callable[[str], None] | None = None,
        name: str | None = None,
    ) -> None:
        if write_checkpoint is not None:
            self._checkpoint(write_checkpoint, name or f"checkpoint_{len(self._kept())}")
        self.log([report.metrics()], name if write_checkpoint is not None else None)
        if self.on_report is not None:
            self.on_report(report)

    # ---- checkpoints: <output_dir>/checkpoints/<name>/, latest recorded as Ray records it ----

    def _kept(self) -> list[str]:
        snap = self.out / CHECKPOINTS / SNAPSHOT
        if not snap.is_file():
            return []
        return json.loads(snap.read_text()).get("raytopk_local_checkpoints", [])

    def _checkpoint(self, write: Callable[[str], None], name: str) -> None:
        root = self.out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(str(tmp))
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)  # a checkpoint directory is whole or absent
        kept = [n for n in self._kept() if n != name] + [name]
        for old in kept[: -self.keep]:
            shutil.rmtree(root / old, ignore_errors=True)
        record = {
            "latest_checkpoint_result": {"checkpoint_dir_name": name},
            "raytopk_local_checkpoints": kept[-self.keep :],
        }
        snap_tmp = root / f"{SNAPSHOT}.tmp"
        snap_tmp.write_text(json.dumps(record))
        os.replace(snap_tmp, root / SNAPSHOT)
