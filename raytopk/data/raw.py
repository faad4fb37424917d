"""Reading the raw RecFlow layout (docs/protocol.md §4.1) for the converter, in bounded memory:
which days are complete, id_cnt, all_stage scanned batch by batch for the needed columns, and the
pickles loaded once with request_id_dict's arrays kept as their raw bytes (``RawArray``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from raytopk.data import schema

__all__ = [
    "ALL_STAGE_NEEDED",
    "NEEDED_FOLDERS",
    "RawArray",
    "as_array",
    "check_ids",
    "check_range",
    "discover_days",
    "gc_paused",
    "incomplete_message",
    "load_raw_pickle",
    "prefetch_files",
    "read_id_cnt",
    "scan_all_stage",
    "vocab_from_id_cnt",
]

NEEDED_FOLDERS = {
    "all_stage": ".feather",
    "request_id_dict": ".pkl",
    "seq_effective_50_dict": ".pkl",
}
ALL_STAGE_NEEDED = (
    "request_id",
    "request_timestamp",
    *schema.USER_FIELDS,
    "video_id",
    "rank_pos",
    "rank_index",
)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except Exception as e:  # truncated/corrupt pickles raise EOFError, UnpicklingError, ...
        raise ValueError(f"{path}: unreadable or truncated pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _read_feather(path: Path, columns: tuple[str, ...]) -> pa.Table:
    """Read ``columns`` of a feather file; ValueError naming the file if unreadable/lacking one."""
    try:
        with pa.ipc.open_file(
            path
        ) as reader:  # feather v2 = Arrow IPC file: footer holds the schema
            names = reader.schema.names
    except Exception:
        names = None  # feather v1 or a damaged file: read_table below decides
    try:
        table = feather.read_table(
            path,
            columns=None if names is None else list(c for c in columns if c in names),
            memory_map=False,
        )
    except Exception as e:
        raise ValueError(
            f"{path}: unreadable or truncated feather ({type(e).__name__}: {e})"
        ) from e
    names = table.schema.names if names is None else names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (columns present: {names})")
    return table.select(list(columns))


def read_id_cnt(src: Path) -> dict[str, int]:
    """Field -> number of unique raw ids, keyed by schema names (real keys: 'photo_id', ...)."""
    path = src / "others" / "id_cnt.pkl"
    if not path.is_file():
        raise ValueError(f"{path}: id_cnt.pkl not found (needed for the vocabulary sizes)")
    raw = _load_pickle(path)
    stripped = {str(k).strip(): v for k, v in raw.items()}
    out = {}
    for field, key in schema.RAW_ID_CNT_KEYS.items():
        v = raw.get(key, stripped.get(key.strip()))
        if v is None:
            raise ValueError(f"{path}: key {key!r} (field {field!r}) missing; keys: {list(raw)}")
        out[field] = int(v)
    return out


def vocab_from_id_cnt(id_cnt: dict[str, int]) -> dict[str, int]:
    """Embedding-table rows: id_cnt + 2 for id fields, schema.TIME_VOCAB for the time fields."""
    vocab = {}
    for table in sorted(set(schema.EMBEDDING_TABLE.values())):
        vocab[table] = id_cnt[table] + 2 if table in id_cnt else schema.TIME_VOCAB[table]
    return vocab


def check_ids(raw: np.ndarray, field: str, vocab: dict[str, int], where: Path) -> None:
    """Raw ids must satisfy 0 <= raw and raw + 1 < vocab (they fit the embedding table)."""
    if raw.size == 0:
        return
    check_range(int(raw.min()), int(raw.max()), field, vocab, where)


def check_range(lo: int, hi: int, field: str, vocab: dict[str, int], where: Path) -> None:
    """Raw ids lo..hi of ``field`` must fit its table (id + 1 stored, 0 = padding)."""
    n = vocab[schema.EMBEDDING_TABLE[field]]
    if lo < 0 or hi + 1 >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where}: field {field!r} has id {bad} beyond the vocabulary "
            f"(id_cnt gives {n - 2}, table rows {n})"
        )


def _days_in(folder: Path, ext: str) -> set[str]:
    return {p.name[: -len(ext)] for p in folder.glob(f"*{ext}") if not p.name.startswith(".")}


def discover_days(src: Path, days: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    """(complete days, {incomplete day: its missing files relative to src}), both sorted.

    A day is every date found in any of the needed folders (or asked for in ``days``); it is
    complete when all three of its files exist."""
    found = {}
    for folder, ext in NEEDED_FOLDERS.items():
        if not (src / folder).is_dir():
            raise ValueError(f"{src / folder}: folder missing from the RecFlow layout")
        found[folder] = _days_in(src / folder, ext)
    wanted = set().union(*found.values()) if days is None else set(days)
    if not wanted:
        raise ValueError(f"{src}: no days found in {list(NEEDED_FOLDERS)}")
    complete, incomplete = [], {}
    for day in sorted(wanted):
        missing = [f"{f}/{day}{ext}" for f, ext in NEEDED_FOLDERS.items() if day not in found[f]]
        if missing:
            incomplete[day] = missing
        else:
            complete.append(day)
    return complete, incomplete


def incomplete_message(src: str | os.PathLike, incomplete: dict[str, list[str]]) -> str:
    """One message naming every incomplete day and the file(s) it lacks."""
    parts = [f"{day} (missing {', '.join(files)})" for day, files in sorted(incomplete.items())]
    msg = f"{src}: {len(incomplete)} incomplete day(s) not converted: " + "; ".join(parts)
    if any(f == f"all_stage/{schema.FIRST_DAY}.feather" for fs in incomplete.values() for f in fs):
        msg += " (RecFlow's Hugging Face copy is known to lack this file)"
    return msg



# ---- loading the pickles -----------------------------------------------------------------------
class RawArray:
    """A pickled numpy array, kept as its raw bytes (what ``ndarray.__setstate__`` would copy).

    Unpickling a day of request_id_dict builds ~1.75M small arrays at real density; keeping their
    bytes instead lets a chunk of requests be joined into one buffer with ``b"".join`` rather than
    through numpy objects (about twice as fast to load, and the join is one memcpy)."""

    __slots__ = ("shape", "dtype", "fortran", "data", "cols")

    def __setstate__(self, state) -> None:
        _, shape, dtype, fortran, data = state
        self.shape, self.dtype, self.fortran, self.data = shape, dtype, fortran, data
        # cols: n columns if the bytes are C-order rows of native int64 (the fast path), else -1.
        ok = len(shape) == 2 and type(data) is bytes and (not fortran or shape[0] <= 1)
        self.cols = shape[1] if ok and (dtype is _LAST_I8[0] or _is_i8(dtype)) else -1

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def array(self) -> np.ndarray:
        if not isinstance(self.data, bytes):  # object arrays pickle a list
            return np.array(self.data, dtype=self.dtype).reshape(self.shape)
        order = "F" if self.fortran else "C"
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape, order=order)


_I8 = np.dtype(np.int64)
_LAST_I8 = [_I8]  # the int64 dtype object of the pickle being read (memoized: one per file)


def _is_i8(dtype) -> bool:
    if dtype == _I8:
        _LAST_I8[0] = dtype
        return True
    return False


def _raw_reconstruct(cls, shape, typecode):  # noqa: ARG001 (numpy's _reconstruct signature)
    return RawArray() if cls is np.ndarray else np.ndarray.__new__(cls, shape, typecode)


class _RawUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _raw_reconstruct
        return super().find_class(module, name)


def as_array(v) -> np.ndarray:
    return v.array() if isinstance(v, RawArray) else np.asarray(v)


def load_raw_pickle(path: Path) -> dict:
    """Like _load_pickle, but numpy arrays (protocol <= 4) stay RawArray bytes."""
    try:
        with open(path, "rb") as f:
            obj = _RawUnpickler(f).load()
    except Exception as e:
        raise ValueError(f"{path}: unreadable or truncated pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj



# ---- one day ---------------------------------------------------------------------------------
def scan_all_stage(path: Path) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]:
    """One pass over all_stage's record batches, reading only the needed columns.

    Returns the request table (first row of each request_id, sorted by request_id: its
    timestamp and user fields) and the rank_pos rows with a valid rank_index as (request_id,
    video_id, rank_index), in file order. Memory: one record batch + these small results."""
    _feather_names(path)
    firsts: list[dict[str, np.ndarray]] = []
    rp_parts: list[tuple[np.ndarray, ...]] = []
    req_cols = ("request_id", "request_timestamp", *schema.USER_FIELDS)
    for batch in _feather_batches(path, ALL_STAGE_NEEDED):
        for c in (*req_cols, "video_id"):
            if batch.column(c).null_count:
                raise ValueError(f"{path}: column {c!r} has missing values")
        rid = batch.column("request_id").to_numpy(zero_copy_only=False)
        if rid.size == 0:
            continue
        # First row of every run of equal request_id (rows of a request are usually adjacent;
        # the global de-duplication below keeps the first occurrence either way).
        start = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])
        firsts.append({c: batch.column(c).to_numpy(zero_copy_only=False)[start] for c in req_cols})
        pos = batch.column("rank_pos").to_numpy(zero_copy_only=False) == 1
        if pos.any():
            ri = batch.column("rank_index").to_numpy(zero_copy_only=False)[pos]
            ok = ~np.isnan(ri) if ri.dtype.kind == "f" else np.ones(ri.size, bool)
            ok &= ri >= 0
            vid = batch.column("video_id").to_numpy(zero_copy_only=False)[pos]
            rp_parts.append((rid[pos][ok], vid[ok], ri[ok]))
    if firsts:
        req = {c: np.concatenate([f[c] for f in firsts]) for c in req_cols}
    else:
        req = {c: np.zeros(0, np.int64) for c in req_cols}
    _, first = np.unique(req["request_id"], return_index=True)  # sorted ids, first occurrence
    req = {c: v[first] for c, v in req.items()}
    if rp_parts:
        rp = tuple(np.concatenate([p[j] for p in rp_parts]) for j in range(3))
    else:
        rp = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    return req, rp


def _feather_names(path: Path) -> list[str] | None:
    """Columns of a feather v2 file (None for v1 or an unreadable file); ValueError naming the
    file if a needed column is missing."""
    try:
        with pa.ipc.open_file(path) as reader:  # feather v2 = Arrow IPC file
            names = reader.schema.names
    except Exception:
        return None  # feather v1 or a damaged file: _feather_batches decides
    missing = [c for c in ALL_STAGE_NEEDED if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (columns present: {names})")
    return names


def _feather_batches(path: Path, columns: tuple[str, ...]):
    """Record batches of ``columns`` (feather v2: one at a time, memory-mapped; v1: whole file)."""
    try:
        source = pa.memory_map(str(path))
        names = pa.ipc.open_file(source).schema.names
        # Decode only the needed columns of each batch (all_stage has 30; we read 10).
        opts = pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns])
        reader = pa.ipc.open_file(source, options=opts)
    except Exception:
        yield from _read_feather(path, columns).to_batches()  # v1 / damaged: old path + errors
        return
    with source:
        try:
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i).select(list(columns))
        except (pa.ArrowException, OSError) as e:
            raise ValueError(
                f"{path}: unreadable or truncated feather ({type(e).__name__}: {e})"
            ) from e



def prefetch_files(*paths: Path) -> None:
    """Ask the kernel to start reading the pickles (read whole, later) while all_stage is scanned;
    a no-op where posix_fadvise is unavailable."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector: unpickling a day creates millions of container objects
    (dicts, tuples), each batch of which would trigger a full-heap scan (this halves the load
    time); nothing here creates reference cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()

