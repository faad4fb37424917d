"""What one worker's training loop receives (``LoopSpec``) and the five steps a backend provides
(``Session``): Ray Train's (``raytopk.ray_env.RayTrainSession``) or one local process's
(``raytopk.train.local.LocalSession``). ``raytopk.train.loop.train_loop(spec, session)`` is the
one training loop; the driver builds the spec (``raytopk.train.driver.loop_spec``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["LoopSpec", "Session"]


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

    def report(self, metrics: dict[str, Any], write_checkpoint: Any = None,
               name: str | None = None) -> None:
        """5: a report (every rank, the same number of times), with rank 0's checkpoint."""
