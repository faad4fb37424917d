"""Training checkpoints: one ``state.pt`` (+ a readable ``config.yaml``) per checkpoint directory.

A checkpoint holds everything needed to continue a run exactly where it stopped (docs/design.md,
Checkpoints and resume): the scorers' and the loss's parameters (the loss owns the learnable
uncertainty weights w_s of docs/protocol.md §3.1), the Adam state, every RNG state (torch, CUDA,
numpy, python), the position (epoch, day, step within the day, global step, samples seen, training
seconds, the days already trained) and the resolved config. It is written with ``torch.save`` and
read back with ``torch.load(weights_only=True)``: only tensors and plain Python values are stored,
so loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

__all__ = [
    "CheckpointError",
    "Position",
    "STATE_FILE",
    "FORMAT_VERSION",
    "save_state",
    "load_state",
    "rng_state",
    "set_rng_state",
]

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
_REQUIRED = ("format", "scorers", "loss", "optimizer", "rng", "position", "config")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the run; the message names the file."""


@dataclass
class Position:
    """Where training stands. ``item`` indexes the (epoch, day) schedule; ``step`` counts the
    batches of that item already trained (0 at a day boundary)."""

    item: int = 0
    step: int = 0
    global_step: int = 0
    samples_seen: int = 0  # training requests, summed over workers
    # Steady-state training wall time (rank 0), summed over restarts; what it leaves out, by
    # part (first_batch_wait, reports, stream_eval), is in excluded_seconds.
    train_seconds: float = 0.0
    excluded_seconds: dict[str, float] = field(default_factory=dict)
    days_done: list[str] = field(default_factory=list)  # "epoch:day" for every finished day
    starts: int = 0  # how many times the loop started (1 + restarts and resumes)
    budget_spent: bool = False  # max_train_seconds / max_samples reached: training is over
    # The anytime points evaluated so far (raytopk.train.anytime): a resumed run keeps them.
    anytime_curve: list[dict[str, Any]] = field(default_factory=list)

    def advance(self, rows: int) -> None:
        """One trained step of ``rows`` requests (summed over workers)."""
        self.step += 1
        self.global_step += 1
        self.samples_seen += rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        return cls(**{k: d[k] for k in asdict(cls()) if k in d})


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors / plain values (weights_only-loadable)."""
    # The legacy global numpy RNG is saved because third-party code may draw from it.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (keys: scorers, loss, optimizer, rng, position, config) into directory."""
    missing = [k for k in _REQUIRED if k != "format" and k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / STATE_FILE
    tmp = d / (STATE_FILE + ".tmp")
    torch.save({"format": FORMAT_VERSION, **state}, tmp)
    tmp.replace(path)  # a reader never sees a half-written state.pt
    (d / CONFIG_FILE).write_text(yaml.safe_dump(state["config"], sort_keys=False))
    return path


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory's state; CheckpointError naming the file when it is unusable."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong file, pickled code: all mean "corrupt"
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt and cannot be loaded "
            f"({type(e).__name__}: {str(e)[:200]}); delete its directory to fall back to an "
            "earlier checkpoint, or start a new run.output_dir"
        ) from e
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a raytopk training state (keys {have}, "
            f"expected {list(_REQUIRED)})"
        )
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {state['format']}, this raytopk reads "
            f"format {FORMAT_VERSION}"
        )
    return state
