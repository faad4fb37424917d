"""What one worker's training loop receives (``LoopSpec``), the names of the datasets it reads,
and the five steps a backend provides (``Session``): Ray Train's
(``raytopk.ray_env.RayTrainSession``) or one local process's
(``raytopk.train.local_session.LocalSession``). ``raytopk.train.loop.train_loop(spec, session)``
is the one training loop; the driver builds the spec (``raytopk.train.driver.loop_spec``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from raytopk.train.events import Report

__all__ = [
    "EPOCH_DATASETS",
    "TEST_KEY",
    "VALID_KEY",
    "LoopSpec",
    "Session",
    "eval_key",
    "train_key",
]

# The names of the datasets a session serves (the driver builds them, raytopk.train.driver.
# dataset_specs; the loop asks for them): a training day per epoch, a streaming-evaluation day,
# the validation day (anytime points), the test day.
TEST_KEY = "test"
VALID_KEY = "valid"
# Distinct datasets (shuffles and negatives) per training day: epochs 0..EPOCH_DATASETS-1 each
# get their own; a later epoch e replays epoch e mod EPOCH_DATASETS. Bounded because the Ray
# backend builds every dataset up front (the study asks for 1000 epochs and stops on a budget).
EPOCH_DATASETS = 16


def train_key(day: str, epoch: int = 0) -> str:
    """The dataset name of training ``day`` in ``epoch``."""
    e = epoch % EPOCH_DATASETS
    return f"train_{day}" if e == 0 else f"train_e{e}_{day}"


def eval_key(day: str) -> str:
    """The dataset name of streaming-evaluation ``day``."""
    return f"eval_{day}"


@dataclass
class LoopSpec:
    """One worker's inputs, the same for both backends (a plain dict on its way through Ray
    Train's ``train_loop_config``: ``as_dict`` / ``from_dict``)."""

    cfg: dict[str, Any]  # the resolved TrainConfig as a dict
    vocab: dict[str, int]  # the dataset's embedding-table sizes (meta.json)
    days: list[str]  # the training days, in order
    next_day: dict[str, str] = field(default_factory=dict)  # streaming eval: day -> next day
    items_path: str | None = None  # the item corpus for full-corpus recall, or None
    threads: int = 1  # torch / numba threads of this worker
    test_day: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopSpec:
        return cls(**d)


@runtime_checkable
class Session(Protocol):
    """The five steps of the loop that differ between backends, each marked ``# Ray:`` where
    ``train_loop`` calls it."""

    rank: int  # 1: this worker's place in the group and its device
    world: int
    device: torch.device

    def restored(self, load: Callable[[str], Any]) -> Any | None:
        """2: the checkpoint to continue from, loaded with ``load(directory)``, or None."""

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """3: the module on the device (wrapped in DDP when there are several workers)."""

    def dataset(self, key: str, batch_size: int, prefetch: int) -> Any:
        """4: this worker's share of dataset ``key`` (a factory of its batch iterator)."""

    def report(self, report: Report, write_checkpoint: Any = None, name: str | None = None) -> None:
        """5: a report (every rank, the same number of times), with rank 0's checkpoint
        (``write_checkpoint(directory)``, saved as ``name``)."""
