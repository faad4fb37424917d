"""Ray Data pipeline over the converted RecFlow parquet dataset (docs/protocol.md §4.2, §4.4, §4.5).

One row = one request. Two builders read the requested days (only schema.REQUEST_COLUMNS) in
date order, cut the stream into groups of ``batch_size`` consecutive requests and append
in-batch negatives to every request of a group in Ray Data workers
(``raytopk.data.sampling.sample_negatives``: n extra candidates drawn uniformly without
replacement from the other requests' valid slots, priority 0), so cand_* columns grow from 40 to
N = 40 + n:
- ``build_train_dataset``: shuffled within each day, n = ``sample_num`` (docs/protocol.md §4.2);
- ``build_eval_dataset``: the evaluation protocol, no shuffle, n = schema.EVAL_SAMPLE_NUM = 160,
  N = schema.N_EVAL = 200 (docs/protocol.md §4.5).

Plan (train):  read_parquet(files of the days, date order) -> add key + narrow ids -> sort(key)
               -> repartition(g x batch_size rows per block) -> map_batches(convert + sample)
Plan (eval):   read_parquet(files, date order) -> narrow ids -> repartition(...) -> map_batches(...)

Narrow ids: right after the read (in the UDF fused with it), every id column is cast from the
parquet's int64 to the narrowest unsigned type its vocabulary allows (``storage_types``, from
meta.json: uint8 for time/category-like fields, uint16/uint32 for larger tables), so the sort,
the repartition and the sampled blocks move 1-4 bytes per id instead of 8 through Ray's object
store; ``collate`` widens them to int64 once per batch. With N = 200 this is ~15-20 bytes per
candidate slot instead of 69, and the pipeline's throughput is bound by those bytes.

Determinism (same path, days, seed -> the same rows in the same order with the same negatives):
- the within-day shuffle is a sort by key = (day ordinal, splitmix64(seed, request_id)): a
  pseudo-random permutation of each day that does not depend on how Ray splits the data into
  blocks (Ray's own ``random_shuffle`` does, and ``union`` interleaves datasets round-robin, so
  neither keeps days apart deterministically);
- ``repartition(target_num_rows_per_block=g * batch_size, strict=True)`` cuts the ordered rows
  into blocks of exactly g * ``batch_size`` consecutive requests (g = ``groups_per_block``;
  only the dataset's last block smaller), whatever the layout after the sort; the sampling UDF
  cuts each block into runs of ``batch_size``, so the groups are the consecutive runs of
  ``batch_size`` requests of the whole dataset (the last one smaller; a group may span a day
  boundary). Iterating with the same ``batch_size`` (``raytopk.data.loader.CascadeBatches``)
  therefore yields exactly the sampling groups: each
  batch's negatives come from that very batch, as in the paper;
- each group's generator is seeded by (seed, sample_num, the group's first request_id, its size).
  RecFlow's request ids are unique, so this identifies (day, group index) without needing the
  group index, which a Ray task cannot know. Consequence: re-iterating the dataset (another epoch)
  gives the same order and the same negatives; build it with another ``seed`` to vary them (the
  training driver passes seed + day index per day).

Ray 2.60 pitfalls (docs/ray.md §5.2–5.3): the reader and sort flags are set in one place,
``raytopk.ray_env.configure_data_context``; ``read_parquet(columns=...)`` is deprecated (we use
``select_columns``); Ray hands fixed_size_list columns to numpy UDFs as object arrays of rows,
so the sampling UDF takes pyarrow batches and converts list columns to (B, K) arrays in one
vectorised step (flatten + reshape) instead of ``batch_format="numpy"``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytopk.data import schema
from raytopk.data.sampling import sample_negatives
from raytopk.ray_env import configure_data_context

__all__ = [
    "TARGET_BLOCK_BYTES",
    "groups_per_block",
    "arrow_to_numpy",
    "build_eval_dataset",
    "build_train_dataset",
    "day_files",
    "load_items",
    "add_shuffle_key",
    "prepare_block",
    "prepare_group",
    "narrow",
    "narrow_block",
    "shuffle_key",
    "storage_types",
]

TARGET_BLOCK_BYTES = 128 * 1024**2  # output block size aimed at (Ray's default maximum)
_KEY = "__raytopk_shuffle_key"  # temporary sort column, dropped by prepare_group
_DAY = "day"  # hive partition column of requests/day=YYYY-MM-DD/
_DAY_BITS = 47  # key = day ordinal << 47 | 47 bits of hash: int64, sorts by day first
_EPOCH_ORDINAL = (_dt.date(2000, 1, 1) - _dt.date(1970, 1, 1)).days  # date32 -> our ordinal


# ---- pure pieces (no Ray) -----------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser (Steele et al., 2014): a bijective 64-bit mixer."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def shuffle_key(request_id: np.ndarray, day_ordinal: np.ndarray, seed: int) -> np.ndarray:
    """int64 sort key: days since 2000-01-01 in the high bits, 47 bits of a seeded hash of the
    request id below, so sorting by it orders by day and pseudo-randomly within a day."""
    salt = _splitmix64(np.array([seed], dtype=np.uint64))  # (1,)
    mixed = _splitmix64(np.asarray(request_id, dtype=np.int64).view(np.uint64) ^ salt)
    low = (mixed >> np.uint64(64 - _DAY_BITS)).astype(np.int64)
    return (np.asarray(day_ordinal, dtype=np.int64) << np.int64(_DAY_BITS)) | low


def _day_key(day: str) -> int:
    """Smallest shuffle key of ``day``."""
    ordinal = (_dt.date.fromisoformat(day) - _dt.date(1970, 1, 1)).days - _EPOCH_ORDINAL
    return ordinal << _DAY_BITS


def arrow_to_numpy(table: pa.Table, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of an Arrow table as numpy: fixed_size_list<T>[K] -> (rows, K), scalars -> (rows,).

    One flatten + reshape per column (no per-row Python); nulls are not expected (the converter
    writes none) and are rejected by name.
    """
    out: dict[str, np.ndarray] = {}
    for name in columns if columns is not None else table.column_names:
        col = table.column(name)
        if col.null_count:
            raise ValueError(f"column '{name}' has {col.null_count} null value(s)")
        arr = col.combine_chunks()
        if pa.types.is_fixed_size_list(arr.type):
            k = arr.type.list_size
            values = arr.flatten()  # honours the array's offset, unlike .values
            out[name] = values.to_numpy(zero_copy_only=False).reshape(len(arr), k)
        else:
            out[name] = arr.to_numpy(zero_copy_only=False)
    return out


def storage_types(vocab: dict[str, int]) -> dict[str, pa.DataType]:
    """Narrowest unsigned Arrow integer type of every id column, from meta.json's vocabulary.

    Stored ids lie in [0, vocab[table]) (the converter rejects ids beyond the vocabulary), so
    an id column fits in uint8/16/32 when its table has at most 2^8/2^16/2^32 rows. The pipeline
    carries ids that narrow (the parquet holds int64) and ``collate`` widens them to int64 once
    per batch: the bytes that cross Ray's object store (sort, repartition, sampled blocks) are
    what bound the pipeline here, and 8 int64 item fields are most of a sampled row.
    request_id stays int64, cand_mask bool, cand_priority float32.
    """
    tables = {**schema.EMBEDDING_TABLE, **{schema.seq_col(f): f for f in schema.SEQ_FIELDS}}
    tables.update({schema.cand_col(f): schema.EMBEDDING_TABLE[f] for f in schema.ITEM_FIELDS})
    out: dict[str, pa.DataType] = {}
    for col in schema.REQUEST_COLUMNS:
        table = tables.get(col)
        if table is None:  # request_id, masks, priority
            continue
        if table not in vocab:
            raise ValueError(f"meta.json 'vocab' has no entry for table '{table}' (column {col})")
        rows = int(vocab[table])
        for t in (pa.uint8(), pa.uint16(), pa.uint32(), pa.int64()):
            if t == pa.int64() or rows <= 1 << t.bit_width:
                out[col] = t
                break
    return out


def narrow(table: pa.Table, types: dict[str, pa.DataType]) -> pa.Table:
    """Cast the id columns of ``table`` to ``types`` (lists keep their size). Arrow's safe cast
    raises on an id that does not fit, so a vocabulary/data mismatch is an error, not a wrap."""
    for name, t in types.items():
        i = table.schema.get_field_index(name)
        if i < 0:
            continue
        old = table.schema.field(i).type
        new = pa.list_(t, old.list_size) if pa.types.is_fixed_size_list(old) else t
        if new != old:
            try:
                col = pc.cast(table.column(i), new)
            except pa.ArrowInvalid as e:
                raise ValueError(f"column '{name}': a value does not fit {new}: {e}") from e
            table = table.set_column(i, name, col)
    return table


def narrow_block(batch: pa.Table, *, types: dict[str, pa.DataType]) -> pa.Table:
    """map_batches UDF (test split, fused with the read): ``narrow``."""
    return narrow(batch, types)


def _group_rng(seed: int, sample_num: int, request_id: np.ndarray) -> np.random.Generator:
    first = int(request_id[0]) & 0xFFFFFFFFFFFFFFFF if request_id.size else 0
    return np.random.default_rng(np.random.SeedSequence([seed, sample_num, first, request_id.size]))


def prepare_group(batch: pa.Table, *, sample_num: int, seed: int) -> dict[str, np.ndarray]:
    """One group of requests -> numpy columns with sampled negatives.

    Returns schema.REQUEST_COLUMNS only (the temporary sort key is dropped); cand_* are
    (B, 40 + sample_num), seq_* (B, 50), scalars (B,).
    """
    cols = arrow_to_numpy(batch, schema.REQUEST_COLUMNS)
    rng = _group_rng(seed, sample_num, cols[schema.REQUEST_ID])
    return sample_negatives(cols, sample_num, rng)


def prepare_block(
    block: pa.Table, *, sample_num: int, seed: int, batch_size: int
) -> dict[str, np.ndarray]:
    """The map_batches UDF: cut a block into consecutive groups of ``batch_size`` requests (the
    last one smaller) and sample each group's negatives (``prepare_group``)."""
    parts = [
        prepare_group(block.slice(s, batch_size), sample_num=sample_num, seed=seed)
        for s in range(0, block.num_rows, batch_size)  # a loop over groups, not requests
    ]
    if not parts:
        return prepare_group(block, sample_num=sample_num, seed=seed)
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


# ---- dataset files -----------------------------------------------------------------------


def _check_dataset(path: str | os.PathLike) -> tuple[Path, list[str]]:
    """(root, days present) of a converted dataset; ValueError naming the path otherwise."""
    root, meta = _read_meta(path)
    return root, list(meta["days"])


def _read_meta(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    from raytopk.data.convert import read_meta

    root = Path(path)
    meta = read_meta(root, "'path'")
    if not (root / "requests").is_dir():
        raise ValueError(
            f"'path' should be a converted dataset (meta.json + requests/, written by "
            f"`jobs/prepare_data.py convert`) but {str(path)!r} has no requests/"
        )
    return root, meta


def day_files(path: str | os.PathLike, day: str) -> list[str]:
    """Sorted parquet files of one converted day; ValueError naming the day and path if absent."""
    root, present = _check_dataset(path)
    try:
        _dt.date.fromisoformat(day)
    except (TypeError, ValueError) as e:
        raise ValueError(f"'days' entries should be 'YYYY-MM-DD' strings but got {day!r}") from e
    files = sorted(str(p) for p in (root / "requests" / f"day={day}").glob("*.parquet"))
    if not files:
        raise ValueError(
            f"day {day} is missing from the converted dataset at {str(root)!r} "
            f"(days present: {present})"
        )
    return files


def groups_per_block(
    batch_size: int, sample_num: int, types: dict[str, pa.DataType] | None = None
) -> int:
    """Sampling groups per Ray block: blocks of about TARGET_BLOCK_BYTES after sampling.

    Several groups per block keep Ray's per-task overhead low; bounded blocks keep the object
    store from spilling. ``types``: the id columns' storage types (``storage_types``; int64
    for those not given).
    """
    types = types or {}

    def width(col: str) -> int:
        return types[col].bit_width // 8 if col in types else 8

    n = schema.N_OWN + sample_num
    item = sum(width(schema.cand_col(f)) for f in schema.ITEM_FIELDS)
    seq = sum(width(schema.seq_col(f)) for f in schema.SEQ_FIELDS)
    scalars = 8 + sum(width(f) for f in (*schema.CONTEXT_FIELDS, *schema.USER_FIELDS))
    row_bytes = n * (item + 1 + 4) + schema.SEQ_LEN * (seq + 1) + scalars
    return max(1, TARGET_BLOCK_BYTES // (row_bytes * batch_size))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"'{name}' must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"'{name}' must be >= {minimum}, got {value}")
    return int(value)


# ---- Ray Data ----------------------------------------------------------------------------


def build_train_dataset(
    path: str | os.PathLike,
    days: str | Sequence[str],
    *,
    sample_num: int,
    batch_size: int,
    seed: int,
) -> Any:
    """A ``ray.data.Dataset`` of the training requests of ``days``: date order, shuffled within
    each day, ``sample_num`` in-batch negatives per request (N = 40 + sample_num).

    Args:
        path: converted dataset directory (OUT of ``jobs/prepare_data.py convert``).
        days: "YYYY-MM-DD" day(s); read in date order whatever order they are given in.
        sample_num: negatives per request, >= 0.
        batch_size: requests per sampling group (use the training batch size).
        seed: >= 0; fixes the shuffle and the negatives (see module doc).
    """
    sample_num = _check_int("sample_num", sample_num, 0)
    batch_size, seed = _check_int("batch_size", batch_size, 1), _check_int("seed", seed, 0)
    ds, days, types = _read(path, days, [*schema.REQUEST_COLUMNS, _DAY])
    ds = ds.map_batches(
        add_shuffle_key,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"seed": seed, "types": types},
        zero_copy_batch=True,
    )
    # Explicit boundaries at the day starts: one sorted output block per day, so the block
    # layout never depends on Ray's random boundary sampling.
    ds = ds.sort(_KEY, boundaries=[_day_key(d) for d in days[1:]])
    return _sample(ds, sample_num=sample_num, batch_size=batch_size, seed=seed, types=types)


def build_eval_dataset(
    path: str | os.PathLike,
    days: str | Sequence[str],
    *,
    batch_size: int,
    seed: int,
    max_requests: int = 0,
) -> Any:
    """A ``ray.data.Dataset`` of the evaluation requests of ``days`` (docs/protocol.md §4.5): file
    order, schema.EVAL_SAMPLE_NUM in-batch negatives per request, N = schema.N_EVAL = 200.

    Args: as :func:`build_train_dataset`; ``batch_size`` is the evaluation batch size.
        ``max_requests`` (> 0): only the first that many requests, limited right after the read,
        so a capped evaluation reads, narrows and samples what it scores and not the whole day.
    """
    batch_size, seed = _check_int("batch_size", batch_size, 1), _check_int("seed", seed, 0)
    max_requests = _check_int("max_requests", max_requests, 0)
    ds, _, types = _read(path, days, list(schema.REQUEST_COLUMNS))
    if max_requests:
        ds = ds.limit(max_requests)
    ds = ds.map_batches(
        narrow_block,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"types": types},
        zero_copy_batch=True,
    )
    return _sample(
        ds, sample_num=schema.EVAL_SAMPLE_NUM, batch_size=batch_size, seed=seed, types=types
    )


def _read(
    path: str | os.PathLike, days: str | Sequence[str], columns: list[str]
) -> tuple[Any, list[str], dict[str, pa.DataType]]:
    """(dataset of ``columns`` of the days' files in date order, the sorted days, id types)."""
    import ray.data
    from ray.data.datasource import Partitioning

    if isinstance(days, str):
        days = [days]
    days = sorted(days)
    if not days:
        raise ValueError("'days' is empty: give at least one 'YYYY-MM-DD' day")
    if len(set(days)) != len(days):
        raise ValueError(f"'days' has duplicates: {days}")
    files = [f for day in days for f in day_files(path, day)]  # date order, then file order
    root, meta = _read_meta(path)
    types = storage_types(meta["vocab"])
    configure_data_context()  # the reader is chosen at read time; the dataset keeps a copy
    ds = ray.data.read_parquet(
        files,
        # the day comes from the hive folder name day=YYYY-MM-DD (the shuffle key needs it)
        partitioning=Partitioning("hive", base_dir=str(root / "requests")),
        file_extensions=["parquet"],
        override_num_blocks=len(files),  # no split into tiny blocks: fewer tasks
    )
    configure_data_context(ds.context)
    return ds.select_columns(columns), days, types


def _sample(
    ds: Any, *, sample_num: int, batch_size: int, seed: int, types: dict[str, pa.DataType]
) -> Any:
    """Cut the ordered rows into sampling groups of ``batch_size`` and add the negatives."""
    # Blocks of exactly g * batch_size consecutive rows (only the last one smaller): the sampling
    # groups follow the row order only, not the block layout the reader or the sort produced.
    rows_per_block = groups_per_block(batch_size, sample_num, types) * batch_size
    ds = ds.repartition(target_num_rows_per_block=rows_per_block, strict=True)
    ds = ds.map_batches(
        prepare_block,
        batch_format="pyarrow",
        batch_size=None,  # one call per block: the UDF cuts it into groups itself
        fn_kwargs={"sample_num": sample_num, "seed": seed, "batch_size": batch_size},
        zero_copy_batch=True,
    )
    configure_data_context(ds.context)
    return ds


def add_shuffle_key(
    batch: pa.Table, *, seed: int, types: dict[str, pa.DataType] | None = None
) -> pa.Table:
    """map_batches UDF (fused with the read): append the int64 sort key of ``shuffle_key``
    (drops the day column) and ``narrow`` the id columns to ``types`` before the sort moves
    them."""
    day = pc.cast(pc.cast(batch.column(_DAY), pa.string()), pa.date32())
    ordinal = day.combine_chunks().view(pa.int32()).to_numpy(zero_copy_only=False)
    rid = batch.column(schema.REQUEST_ID).combine_chunks().to_numpy(zero_copy_only=False)
    key = shuffle_key(rid, ordinal.astype(np.int64) - _EPOCH_ORDINAL, seed)
    batch = narrow(batch, types or {})
    return batch.drop_columns([_DAY]).append_column(_KEY, pa.array(key, type=pa.int64()))


def load_items(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The item corpus: schema.ITEM_TABLE_COLUMNS -> (M,) int64 stored ids (one row per video).

    ``path`` is a converted dataset directory (reads its items.parquet) or an items.parquet file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "items.parquet"
    if not p.is_file():
        raise ValueError(
            f"'path' should be a converted dataset or its items.parquet but got {str(path)!r} "
            f"({p} does not exist)"
        )
    try:
        table = pq.read_table(p, columns=list(schema.ITEM_TABLE_COLUMNS))
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        cols = list(schema.ITEM_TABLE_COLUMNS)
        raise ValueError(f"{p}: cannot read item columns {cols}: {e}") from e
    return {c: np.asarray(v, dtype=np.int64) for c, v in arrow_to_numpy(table).items()}
