"""CascadeBatch: the one typed batch that crosses from raytopk.data to raytopk.train.

Notation: B = requests in the batch, L = behaviour sequence length (50), N = candidates per
request (40 own slots + sampled negatives), F = item features (len(schema.ITEM_FIELDS) = 8).
All id tensors hold stored ids (raw + 1, 0 = padding) as int64 (the pipeline carries them as
narrow unsigned ints and ``collate`` widens them once per batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch

from raytopk.data import schema

__all__ = ["CascadeBatch", "collate", "random_batch"]


@dataclass
class CascadeBatch:
    context: torch.Tensor  # (B, 3) int64: weekday, hour, minute   (schema.CONTEXT_FIELDS)
    user: torch.Tensor  # (B, 5) int64: user_id, device_id, gender, age, province
    seq: torch.Tensor  # (B, L, 5) int64: schema.SEQ_FIELDS
    seq_mask: torch.Tensor  # (B, L) bool, True = real behaviour
    items: torch.Tensor  # (B, N, F) int64: schema.ITEM_FIELDS
    cand_mask: torch.Tensor  # (B, N) bool, True = valid candidate slot
    priority: torch.Tensor  # (B, N) float32, docs/protocol.md §4.3 (0 for sampled negatives)
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
            "(build the dataset with raytopk.data.pipeline's build_train_dataset or "
            "build_eval_dataset)"
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


def _default_vocab() -> dict[str, int]:
    """Small tables for tests and benchmarks: 30 rows per id table, the real time tables."""
    tables = sorted(set(schema.EMBEDDING_TABLE.values()))
    return {t: schema.TIME_VOCAB.get(t, 30) for t in tables}


def _recflow_priority(b: int, n: int, g: torch.Generator) -> torch.Tensor:
    """docs/protocol.md §4.3 priorities by slot: the four groups of GROUP_SIZE slots (rank_pos 30 −
    rank_index with rank_index a random permutation, then rank_neg, coarse_neg, prerank_neg),
    then sampled negatives (0). (B, N) float32."""
    size = schema.GROUP_SIZE
    rank_index = torch.rand(b, size, generator=g).argsort(-1)  # (B, GROUP_SIZE)
    prio = torch.full((b, n), schema.SAMPLED_PRIORITY)
    prio[:, : min(n, size)] = (schema.RANK_POS_BASE - rank_index[:, :n]).float()
    for i, group in enumerate(schema.CAND_GROUPS[1:], start=1):
        prio[:, i * size : (i + 1) * size] = schema.GROUP_PRIORITY[group]
    return prio


def _check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...], bool_: bool) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape or (bool_ and t.dtype != torch.bool):
        want = f"a bool tensor of shape {shape}" if bool_ else f"a tensor of shape {shape}"
        raise ValueError(f"'{name}' should be {want} but got {t.dtype} {tuple(t.shape)}")


def random_batch(
    batch_size: int,
    num_candidates: int,
    vocab: Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    priority: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    seq_mask: torch.Tensor | None = None,
    seq_len: int = schema.SEQ_LEN,
) -> CascadeBatch:
    """A valid random CascadeBatch for tests and benchmarks (as torchrec's RandomRecDataset).

    Args:
        batch_size: B requests.
        num_candidates: N candidate slots per request.
        vocab: embedding-table name -> rows (meta.json's "vocab"); every id of a feature lies in
            [1, rows of its table) (0 = padding). Default: 30 rows per id table and the real
            weekday/hour/minute tables.
        seed: seeds the torch.Generator every random draw comes from (same seed, same batch).
        priority: (B, N) priorities, used as given (dtype kept); default docs/protocol.md §4.3's
            by slot (rank_pos 30 − rank_index, then 7, 6, 5, and 0 for slots past the 40 own ones).
        mask: (B, N) bool candidate mask; default about 80% valid slots.
        seq_mask: (B, L) bool behaviour mask; default about 60% valid positions.
        seq_len: L, when seq_mask is not given.

    Padded behaviours and masked candidate slots hold id 0 (as the converter writes them); the
    default priority is 0 at masked slots. request_id = 0..B−1.
    """
    for name, v in (("batch_size", batch_size), ("num_candidates", num_candidates)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"'{name}' should be an int >= 1 but got {v!r}")
    b, n = batch_size, num_candidates
    vocab = _default_vocab() if vocab is None else dict(vocab)
    for f, t in schema.EMBEDDING_TABLE.items():
        if t not in vocab:
            raise ValueError(f"'vocab' is missing table {t!r} (feature {f!r}); got {sorted(vocab)}")
        if isinstance(vocab[t], bool) or not isinstance(vocab[t], int) or vocab[t] < 2:
            raise ValueError(f"'vocab[{t!r}]' should be an int >= 2 but got {vocab[t]!r}")
    _check_shape("priority", priority, (b, n), False)
    _check_shape("mask", mask, (b, n), True)
    if seq_mask is not None:
        seq_len = seq_mask.shape[-1]
    _check_shape("seq_mask", seq_mask, (b, seq_len), True)
    g = torch.Generator().manual_seed(seed)

    def ids(fields: tuple[str, ...], *shape: int) -> torch.Tensor:
        """(*shape, len(fields)) int64, each feature's ids in [1, rows of its table)."""
        cols = [
            torch.randint(1, vocab[schema.EMBEDDING_TABLE[f]], shape, generator=g) for f in fields
        ]
        return torch.stack(cols, dim=-1)

    if seq_mask is None:
        seq_mask = torch.rand(b, seq_len, generator=g) > 0.4
    if mask is None:
        mask = torch.rand(b, n, generator=g) > 0.2
    seq = ids(schema.SEQ_FIELDS, b, seq_len).masked_fill(~seq_mask.unsqueeze(-1), 0)  # (B, L, 5)
    items = ids(schema.ITEM_FIELDS, b, n).masked_fill(~mask.unsqueeze(-1), 0)  # (B, N, F)
    if priority is None:
        priority = _recflow_priority(b, n, g).masked_fill(~mask, 0.0)
    return CascadeBatch(
        context=ids(schema.CONTEXT_FIELDS, b),  # (B, 3)
        user=ids(schema.USER_FIELDS, b),  # (B, 5)
        seq=seq,
        seq_mask=seq_mask,
        items=items,
        cand_mask=mask,
        priority=priority,
        request_id=torch.arange(b),
    )
