"""CascadeBatch: the one typed batch that crosses from raytopk.data to raytopk.train.

Notation: B = requests in the batch, L = behaviour sequence length (50), N = candidates per
request (40 own slots + sampled negatives), F = item features (len(schema.ITEM_FIELDS) = 8).
All id tensors hold stored ids (raw + 1, 0 = padding) as int64 (the pipeline carries them as
narrow unsigned ints and ``collate`` widens them once per batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from raytopk.data import schema

__all__ = ["CascadeBatch", "collate"]


@dataclass
class CascadeBatch:
    context: torch.Tensor  # (B, 3) int64: weekday, hour, minute   (schema.CONTEXT_FIELDS)
    user: torch.Tensor  # (B, 5) int64: user_id, device_id, gender, age, province
    seq: torch.Tensor  # (B, L, 5) int64: schema.SEQ_FIELDS
    seq_mask: torch.Tensor  # (B, L) bool, True = real behaviour
    items: torch.Tensor  # (B, N, F) int64: schema.ITEM_FIELDS
    cand_mask: torch.Tensor  # (B, N) bool, True = valid candidate slot
    priority: torch.Tensor  # (B, N) float32, SPEC.md §4.3 (0 for sampled negatives)
    request_id: torch.Tensor  # (B,) int64

    @property
    def batch_size(self) -> int:
        return self.items.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.items.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CascadeBatch:
        return CascadeBatch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def pin_memory(self) -> CascadeBatch:
        return CascadeBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def _col(np_batch: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in np_batch:
        raise ValueError(f"collate: batch is missing column '{name}'; got {sorted(np_batch)}")
    arr = np_batch[name]
    if not isinstance(arr, np.ndarray) or arr.dtype == object:
        # Ray hands fixed_size_list columns that skipped the pipeline's conversion as object
        # arrays of rows; the pipeline never does, so this is a clear error, not a slow path.
        raise ValueError(
            f"collate: column '{name}' must be a numeric numpy array, got "
            f"{type(arr).__name__} of dtype {getattr(arr, 'dtype', None)} "
            "(build the dataset with raytopk.data.pipeline.build_dataset)"
        )
    return arr


def _one(np_batch: dict[str, np.ndarray], name: str, dtype: type) -> torch.Tensor:
    arr = _col(np_batch, name)
    # A fresh array whenever the dtype changes; otherwise Ray's batches can be read-only views
    # of the object store and torch needs writable memory.
    out = arr.astype(dtype, copy=False)
    return torch.from_numpy(out if out.flags.writeable else out.copy())


def _stack(np_batch: dict[str, np.ndarray], names: list[str]) -> torch.Tensor:
    """(B, ...) per feature -> (B, ..., F) int64 in schema order, widened in one pass.

    The pipeline carries ids as narrow unsigned ints (raytopk.data.pipeline.storage_types);
    each column is written once into a preallocated int64 array (no astype + stack copies)."""
    cols = [_col(np_batch, c) for c in names]
    shape = cols[0].shape
    for c, a in zip(names, cols):
        if a.shape != shape:
            raise ValueError(
                f"collate: column '{c}' has shape {a.shape}, expected {shape} like '{names[0]}'"
            )
    out = np.empty((*shape, len(cols)), dtype=np.int64)
    for f, a in enumerate(cols):
        out[..., f] = a
    return torch.from_numpy(out)


def collate(np_batch: dict[str, np.ndarray]) -> CascadeBatch:
    """Turn one numpy batch of the pipeline (column -> (B, ...) array) into a CascadeBatch.

    Columns are the converted dataset's (schema.REQUEST_COLUMNS); cand_* are (B, N) with
    N = 40 + sample_num. Id columns may be any integer dtype (the pipeline carries them
    narrow); the batch's id tensors are int64. Whole-column numpy operations only, no per-row
    Python.
    """
    return CascadeBatch(
        context=_stack(np_batch, list(schema.CONTEXT_FIELDS)),  # (B, 3)
        user=_stack(np_batch, list(schema.USER_FIELDS)),  # (B, 5)
        seq=_stack(np_batch, [schema.seq_col(f) for f in schema.SEQ_FIELDS]),  # (B, L, 5)
        seq_mask=_one(np_batch, schema.SEQ_MASK, np.bool_),  # (B, L)
        items=_stack(np_batch, [schema.cand_col(f) for f in schema.ITEM_FIELDS]),  # (B, N, F)
        cand_mask=_one(np_batch, schema.CAND_MASK, np.bool_),  # (B, N)
        priority=_one(np_batch, schema.CAND_PRIORITY, np.float32),  # (B, N)
        request_id=_one(np_batch, schema.REQUEST_ID, np.int64),  # (B,)
    )
