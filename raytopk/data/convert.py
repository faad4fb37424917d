"""RecFlow raw layout (SPEC.md §4.1) -> the per-request parquet dataset training reads.

RecFlow: Liu et al., "RecFlow: An Industrial Full Flow Recommendation Dataset", ICLR 2025.
One output row per request (SPEC.md §4.2): time features of request_timestamp in Asia/Shanghai,
user features, the 50-step behaviour sequence + mask, and N = 40 candidate slots in group order
rank_pos, rank_neg, coarse_neg, prerank_neg (the first <= 10 items of each stage of
request_id_dict, in stored order), with per-slot mask and ground-truth priority (SPEC.md §4.3)

    priority = 30 − rank_index  (rank_pos; rank_index looked up by (request_id, video_id) among the
                                 day's rank_pos rows of all_stage)
             = 7, 6, 5          (rank_neg, coarse_neg, prerank_neg);  0 and masked at padding.

Every stored id is raw id + 1 with 0 reserved for padding, category_level_one included (the
authors' code leaves category_level_one unshifted with 2 as its padding; we do not). A rank_pos
item whose rank_index cannot be found (or is negative) gets MISSING_RANK_PRIORITY = 8, the lowest
priority that still ranks it above every rank_neg slot, and is counted in meta.json.

Output (a public interface):
    OUT/requests/day=YYYY-MM-DD/part-NNNNN.parquet   columns schema.REQUEST_COLUMNS
    OUT/items.parquet                                 schema.ITEM_TABLE_COLUMNS, one row per video
    OUT/meta.json                                     schema_version, vocab, days, counts, num_items
    OUT/_per_day/YYYY-MM-DD/{items.parquet,counts.json}  per-day side outputs (for re-runs)

Days are streamed one at a time; each is written to a temporary directory and renamed into place
only when complete, so a failure never leaves a partial day, and a re-run skips finished days.
A day lacking one of its three files is not converted; the others are, and the incomplete ones
are reported (``days_incomplete``; an error only with ``strict``). Requests kept are those in
both all_stage (user features, timestamp) and request_id_dict (candidates); the others are
dropped and counted. A request missing from the sequence pickle gets an empty sequence (counted).
The realshow/ folder is not needed and not read.

Memory and speed (a real RecFlow day: ~250K requests, ~50M all_stage rows, ~4.4 GB of pickles):
all_stage is read one record batch at a time, decoding only the 10 columns used; the pickles are
loaded once, request_id_dict's arrays kept as their raw bytes (_RawArray); requests are then
converted CHUNK_REQUESTS at a time, vectorised over the chunk, their dictionary entries freed,
and every ROW_GROUP_REQUESTS rows written as a parquet row group on a writer thread. Peak memory
is about the two pickles' payload plus a few chunks (~5 GB for a real-density day). The output
is the same, row for row and value for value, as the previous whole-day converter's
(tests/unit/convert_v1_oracle.py, compared in tests/unit/test_convert_scale.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from raytopk.data import schema

__all__ = [
    "convert",
    "read_meta",
    "missing_days",
    "incomplete_message",
    "time_features",
    "MISSING_RANK_PRIORITY",
]

MISSING_RANK_PRIORITY = schema.GROUP_PRIORITY["rank_neg"] + 1.0
ROWS_PER_PART = 100_000  # requests per parquet file
ROW_GROUP_REQUESTS = 10_000  # requests per parquet row group, written as soon as it is ready
# Requests converted at once. Small enough that a chunk's buffers (~30 MB at real density) stay
# under glibc's largest mmap threshold and are reused from the heap rather than page-faulted in
# afresh for every chunk (a third fewer page faults than chunks of 10,000).
CHUNK_REQUESTS = 2_500
assert ROWS_PER_PART % ROW_GROUP_REQUESTS == 0 and ROW_GROUP_REQUESTS % CHUNK_REQUESTS == 0
_NEEDED_FOLDERS = {
    "all_stage": ".feather",
    "request_id_dict": ".pkl",
    "seq_effective_50_dict": ".pkl",
}
_ALL_STAGE_NEEDED = (
    "request_id",
    "request_timestamp",
    *schema.USER_FIELDS,
    "video_id",
    "rank_pos",
    "rank_index",
)
_SF = {f: i for i, f in enumerate(schema.RAW_STAGE_ITEM_FIELDS)}  # request_id_dict columns
_QF = {f: i for i, f in enumerate(schema.RAW_SEQ_FIELDS)}  # sequence columns
_ID_ITEM_FIELDS = schema.SEQ_FIELDS  # the five id fields of an item, ITEM_FIELDS order
_UPLOAD_FIELDS = ("upload_weekday", "upload_hour", "upload_minute")


# ---- small helpers ---------------------------------------------------------------------------
# Asia/Shanghai has been UTC+8 without daylight saving since 1991-09-15; between these instants
# (UTC seconds) local time is plain arithmetic, which is ~20x faster than a tz conversion.
_FIXED_OFFSET_SPAN = (694_224_000, 4_102_444_800)  # 1992-01-01 .. 2100-01-01
_UTC_OFFSET_S = 8 * 3600


def time_features(ts: np.ndarray, unit: str) -> dict[str, np.ndarray]:
    """Stored weekday/hour/minute (value + 1; Monday = 0) of epoch timestamps in Asia/Shanghai."""
    ts = np.asarray(ts, dtype=np.int64)
    sec = ts // 1000 if unit == "ms" else ts
    if unit in ("s", "ms") and (
        sec.size == 0 or (sec.min() >= _FIXED_OFFSET_SPAN[0] and sec.max() < _FIXED_OFFSET_SPAN[1])
    ):
        local = sec + _UTC_OFFSET_S
        return {
            "weekday": (local // 86_400 + 3) % 7 + 1,  # 1970-01-01 was a Thursday
            "hour": local % 86_400 // 3600 + 1,
            "minute": local % 3600 // 60 + 1,
        }
    idx = pd.to_datetime(ts, unit=unit, utc=True).tz_convert(ZoneInfo(schema.TIME_ZONE))
    return {
        "weekday": np.asarray(idx.day_of_week, dtype=np.int64) + 1,
        "hour": np.asarray(idx.hour, dtype=np.int64) + 1,
        "minute": np.asarray(idx.minute, dtype=np.int64) + 1,
    }


def _upload_seconds(x: np.ndarray) -> np.ndarray:
    """Upload times are seconds in request_id_dict; tolerate millisecond values (> 1e11 s is
    beyond year 5000, so such a value can only be milliseconds)."""
    x = np.asarray(x, dtype=np.int64)
    return np.where(x > 10**11, x // 1000, x)


def _fixed_list(values: np.ndarray, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), size)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def _read_id_cnt(src: Path) -> dict[str, int]:
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


def _vocab(id_cnt: dict[str, int]) -> dict[str, int]:
    """Embedding-table rows: id_cnt + 2 for id fields, schema.TIME_VOCAB for the time fields."""
    vocab = {}
    for table in sorted(set(schema.EMBEDDING_TABLE.values())):
        vocab[table] = id_cnt[table] + 2 if table in id_cnt else schema.TIME_VOCAB[table]
    return vocab


def _check_ids(raw: np.ndarray, field: str, vocab: dict[str, int], where: Path) -> None:
    """Raw ids must satisfy 0 <= raw and raw + 1 < vocab (they fit the embedding table)."""
    if raw.size == 0:
        return
    lo, hi = int(raw.min()), int(raw.max())
    n = vocab[schema.EMBEDDING_TABLE[field]]
    if lo < 0 or hi + 1 >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where}: field {field!r} has id {bad} beyond the vocabulary "
            f"(id_cnt gives {n - 2}, table rows {n})"
        )


def _days_in(folder: Path, ext: str) -> set[str]:
    return {p.name[: -len(ext)] for p in folder.glob(f"*{ext}") if not p.name.startswith(".")}


def _discover_days(src: Path, days: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    """(complete days, {incomplete day: its missing files relative to src}), both sorted.

    A day is every date found in any of the needed folders (or asked for in ``days``); it is
    complete when all three of its files exist."""
    found = {}
    for folder, ext in _NEEDED_FOLDERS.items():
        if not (src / folder).is_dir():
            raise ValueError(f"{src / folder}: folder missing from the RecFlow layout")
        found[folder] = _days_in(src / folder, ext)
    wanted = set().union(*found.values()) if days is None else set(days)
    if not wanted:
        raise ValueError(f"{src}: no days found in {list(_NEEDED_FOLDERS)}")
    complete, incomplete = [], {}
    for day in sorted(wanted):
        missing = [f"{f}/{day}{ext}" for f, ext in _NEEDED_FOLDERS.items() if day not in found[f]]
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


def missing_days(meta_or_path: dict | str | os.PathLike, wanted_days: list[str]) -> list[str]:
    """The days of ``wanted_days`` ("YYYY-MM-DD", ranges already expanded) absent from a
    converted dataset, in the order given. ``meta_or_path``: read_meta's dict, the dataset
    directory or its meta.json. Pure (reads meta.json only): the training driver can call it
    before any worker starts and name the missing days."""
    meta = meta_or_path if isinstance(meta_or_path, dict) else read_meta(meta_or_path)
    present = set(meta["days"])
    return [d for d in wanted_days if d not in present]


# ---- loading the pickles -----------------------------------------------------------------------
class _RawArray:
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
    return _RawArray() if cls is np.ndarray else np.ndarray.__new__(cls, shape, typecode)


class _RawUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _raw_reconstruct
        return super().find_class(module, name)


def _as_array(v) -> np.ndarray:
    return v.array() if isinstance(v, _RawArray) else np.asarray(v)


def _load_raw_pickle(path: Path) -> dict:
    """Like _load_pickle, but numpy arrays (protocol <= 4) stay _RawArray bytes."""
    try:
        with open(path, "rb") as f:
            obj = _RawUnpickler(f).load()
    except Exception as e:
        raise ValueError(f"{path}: unreadable or truncated pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


# ---- one day ---------------------------------------------------------------------------------
def _scan_all_stage(path: Path) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]:
    """One pass over all_stage's record batches, reading only the needed columns.

    Returns the request table (first row of each request_id, sorted by request_id: its
    timestamp and user fields) and the rank_pos rows with a valid rank_index as (request_id,
    video_id, rank_index), in file order. Memory: one record batch + these small results."""
    _feather_names(path)
    firsts: list[dict[str, np.ndarray]] = []
    rp_parts: list[tuple[np.ndarray, ...]] = []
    req_cols = ("request_id", "request_timestamp", *schema.USER_FIELDS)
    for batch in _feather_batches(path, _ALL_STAGE_NEEDED):
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
    missing = [c for c in _ALL_STAGE_NEEDED if c not in names]
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


class _RankLookup:
    """rank_index of (request, video) among the day's rank_pos rows: the first valid row wins."""

    def __init__(self, rp: tuple[np.ndarray, ...], ids: np.ndarray, n_video: int) -> None:
        rid, vid, ri = rp
        vid = vid.astype(np.int64, copy=False)
        idx = np.searchsorted(ids, rid)
        ok = (idx < ids.size) & (vid >= 0) & (vid < n_video)
        ok[ok] = ids[idx[ok]] == rid[ok]
        if ids.size * n_video >= 2**62:
            raise ValueError(f"{ids.size} requests x {n_video} videos overflow the lookup key")
        self.n_video = n_video
        keys = idx[ok] * n_video + vid[ok]
        self.keys, first = np.unique(keys, return_index=True)  # stable: first occurrence
        self.rank = ri[ok][first]

    def __call__(self, idx: np.ndarray, vid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, rank_index as float64) for request positions ``idx`` and raw video ids.
        (An out-of-vocabulary video may alias another key; the caller's id check rejects it.)"""
        if not self.keys.size:
            return np.zeros(idx.size, bool), np.zeros(idx.size, np.float64)
        key = idx * self.n_video + vid
        pos = np.minimum(np.searchsorted(self.keys, key), self.keys.size - 1)
        found = self.keys[pos] == key
        return found, np.where(found, self.rank[pos], 0).astype(np.float64)


def _stage_rows(
    dicts: list[dict], stages: tuple[str, ...], path: Path
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """All stage arrays of a chunk of requests as one raw (n, 8) int64 block, in request order
    then each request's dict order (the item corpus' first-occurrence order), plus for each of
    ``stages`` the (row offset, length) of that stage per request (length 0 where absent)."""
    F = len(schema.RAW_STAGE_ITEM_FIELDS)
    R = len(dicts)
    off = {g: np.zeros(R, np.int64) for g in stages}
    lens = {g: np.zeros(R, np.int64) for g in stages}
    pieces: list[bytes] = []
    row = 0
    for i, d in enumerate(dicts):
        for stage, v in d.items():
            if type(v) is _RawArray and v.cols == F:
                n = v.shape[0]
                pieces.append(v.data)
            elif len(v) == 0:
                continue
            else:
                a = _as_array(v)
                if a.ndim != 2 or a.shape[1] != F:
                    raise ValueError(
                        f"{path}: stage {stage!r} arrays have shape (n, {a.shape[1:]}), "
                        f"want (n, {F})"
                    )
                n = a.shape[0]
                pieces.append(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            if stage in off:
                off[stage][i], lens[stage][i] = row, n
            row += n
    flat = np.frombuffer(b"".join(pieces), dtype=np.int64).reshape(-1, F)
    return flat, {g: (off[g], lens[g]) for g in stages}


def _first_slots(off: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the first <= GROUP_SIZE items per request: (request, slot, row in the block)."""
    k = np.minimum(n, schema.GROUP_SIZE)
    r = np.repeat(np.arange(k.size), k)
    slot = np.arange(r.size) - np.repeat(np.cumsum(k) - k, k)
    return r, slot, off[r] + slot


class _ItemCorpus:
    """The day's unique raw items (video_id, author, cat2, cat1, upload_type, upload_s) in first-
    occurrence order: every stage of request_id_dict first, then behaviour-sequence items not
    seen there. A seen-bitmap over the video vocabulary keeps de-duplication O(n)."""

    _STAGE_COLS = [_SF[f] for f in _ID_ITEM_FIELDS] + [_SF["upload_timestamp"]]
    _SEQ_COLS = [_QF[f] for f in _ID_ITEM_FIELDS] + [_QF["upload_time"]]

    def __init__(self, vocab: dict, r_path: Path) -> None:
        self.vocab, self.r_path = vocab, r_path
        self.seen = np.zeros(vocab["video_id"], dtype=bool)
        self.tables: list[np.ndarray] = []
        self.seq_seen = np.zeros(vocab["video_id"], dtype=bool)
        self.seq_tables: list[np.ndarray] = []
        self._first = np.zeros(vocab["video_id"], dtype=np.int64)  # scratch for _new_rows

    def _first_new(self, vid: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Positions of the first occurrence of each video of ``vid`` not in ``seen``, in order;
        marks those videos seen. O(n): np.unique would sort."""
        fresh = np.flatnonzero(~seen[vid])
        if not fresh.size:
            return fresh
        v = vid[fresh]
        at = np.arange(v.size)
        # Assigning in reverse leaves each video's first position (numpy writes a repeated
        # index in order, so the last write wins).
        self._first[v[::-1]] = at[::-1]
        fresh = fresh[self._first[v] == at]
        seen[vid[fresh]] = True
        return fresh

    def add_stage_rows(self, flat: np.ndarray) -> None:
        """flat: raw (n, 8) request_id_dict rows."""
        if not flat.size:
            return
        lo, hi = _column_min_max(flat)
        for f in _ID_ITEM_FIELDS:
            j = _SF[f]
            _check_range(int(lo[j]), int(hi[j]), f, self.vocab, self.r_path)
        new = self._first_new(flat[:, _SF["video_id"]], self.seen)
        if new.size:
            self.tables.append(flat[new][:, self._STAGE_COLS])

    def add_seq_rows(self, rows: np.ndarray) -> None:
        """rows: raw (n, 10) valid behaviour-sequence steps, ids already validated."""
        if rows.size:
            new = self._first_new(rows[:, _QF["video_id"]], self.seq_seen)
            if new.size:
                self.seq_tables.append(rows[new][:, self._SEQ_COLS])

    def rows(self) -> np.ndarray:
        for t in self.seq_tables:  # after every stage row: keep those not seen in any stage
            t = t[~self.seen[t[:, 0]]]
            if t.size:
                self.tables.append(t)
        return np.concatenate(self.tables) if self.tables else np.zeros((0, 6), dtype=np.int64)


def _column_min_max(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column min and max of a non-empty C-order (n, F) array. ``a.min(0)`` walks F-wide
    rows; viewing 8 rows at a time as one 8F-wide row lets numpy vectorise (~5x faster)."""
    n, F = a.shape
    k = n - n % 8
    lo, hi = [], []
    if k:
        wide = a[:k].reshape(-1, 8 * F)
        lo.append(wide.min(0).reshape(8, F).min(0))
        hi.append(wide.max(0).reshape(8, F).max(0))
    if k < n:
        lo.append(a[k:].min(0))
        hi.append(a[k:].max(0))
    return np.min(lo, 0), np.max(hi, 0)


def _check_range(lo: int, hi: int, field: str, vocab: dict[str, int], where: Path) -> None:
    n = vocab[schema.EMBEDDING_TABLE[field]]
    if lo < 0 or hi + 1 >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where}: field {field!r} has id {bad} beyond the vocabulary "
            f"(id_cnt gives {n - 2}, table rows {n})"
        )


def _items_table(raw_items: np.ndarray) -> pa.Table:
    """Raw item rows -> stored item table (schema.ITEM_TABLE_COLUMNS)."""
    cols = {f: raw_items[:, j] + 1 for j, f in enumerate(_ID_ITEM_FIELDS)}
    tf = time_features(_upload_seconds(raw_items[:, 5]), "s")
    for f, g in zip(_UPLOAD_FIELDS, ("weekday", "hour", "minute")):
        cols[f] = tf[g]
    return pa.table({f: pa.array(cols[f], pa.int64()) for f in schema.ITEM_TABLE_COLUMNS})


def _seq_block(seq_dict: dict, ids: list, q_path: Path) -> tuple[np.ndarray, int]:
    """Raw (R, 50, 10) int64 sequences of ``ids`` (zeros where absent) and how many are absent."""
    L, QF = schema.SEQ_LEN, len(schema.RAW_SEQ_FIELDS)
    zero = bytes(L * QF * 8)
    pieces, missing = [], 0
    for r in ids:
        v = seq_dict.get(r)
        if v is None:
            missing += 1
            pieces.append(zero)
        elif type(v) is _RawArray and v.cols == QF and v.shape[0] == L:
            pieces.append(v.data)
        else:
            a = _as_array(v)
            if a.shape != (L, QF):
                raise ValueError(
                    f"{q_path}: sequences have shape {a.shape}, want ({L}, {QF}) (request {r})"
                )
            pieces.append(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return np.frombuffer(b"".join(pieces), dtype=np.int64).reshape(len(ids), L, QF), missing


def _chunk_table(
    ids_np: np.ndarray,  # this chunk's request ids (sorted)
    lo: int,
    req: dict[str, np.ndarray],
    rid_dict: dict,
    seq_dict: dict,
    rank: _RankLookup,
    items: _ItemCorpus,
    vocab: dict,
    paths: tuple[Path, Path, Path],
    counts: dict,
) -> pa.Table:
    """Output rows (schema.REQUEST_COLUMNS) of a chunk of requests starting at position ``lo`` of
    the day's sorted ids; frees their dict entries once read. ``req``: the chunk's rows of the
    request table; ``counts`` is updated in place."""
    a_path, r_path, q_path = paths
    ids = ids_np.tolist()
    R = len(ids)
    cols: dict[str, pa.Array] = {schema.REQUEST_ID: pa.array(ids_np, pa.int64())}
    tf = time_features(req["request_timestamp"].astype(np.int64, copy=False), "ms")
    for f in schema.CONTEXT_FIELDS:
        cols[f] = pa.array(tf[f], pa.int64())
    for f in schema.USER_FIELDS:
        raw = req[f].astype(np.int64, copy=False)
        _check_ids(raw, f, vocab, a_path)
        cols[f] = pa.array(raw + 1, pa.int64())

    # Behaviour sequence: left-padded (50, 10); a row is padding iff time_ms == 0.
    L = schema.SEQ_LEN
    seq_raw, missing_seq = _seq_block(seq_dict, ids, q_path)
    for r in ids:
        seq_dict.pop(r, None)
    seq_mask = seq_raw[:, :, _QF["time_ms"]] != 0
    valid_steps = seq_raw[seq_mask]  # (n, 10)
    for f in schema.SEQ_FIELDS:
        _check_ids(valid_steps[:, _QF[f]], f, vocab, q_path)
        raw = seq_raw[:, :, _QF[f]]
        cols[schema.seq_col(f)] = _fixed_list(np.where(seq_mask, raw + 1, 0), L)
    cols[schema.SEQ_MASK] = _fixed_list(seq_mask, L)
    counts["requests_missing_seq"] += missing_seq
    counts["requests_empty_seq"] += int((~seq_mask.any(1)).sum())
    items.add_seq_rows(valid_steps)
    del seq_raw, valid_steps

    # Candidates: 4 groups x 10 slots, from one block of every stage row of the chunk.
    dicts = [rid_dict.pop(r) for r in ids]
    flat, where = _stage_rows(dicts, schema.CAND_GROUPS, r_path)
    del dicts
    G, N = schema.GROUP_SIZE, schema.N_OWN
    pos = np.full(R * N, -1, dtype=np.int64)  # slot (request * N + column) -> row of ``flat``
    prio = np.zeros(R * N, dtype=np.float32)
    for gi, g in enumerate(schema.CAND_GROUPS):
        r_i, slot, rows = _first_slots(*where[g])
        at = r_i * N + gi * G + slot
        pos[at] = rows
        if g == "rank_pos":
            found, rk = rank(lo + r_i, flat[rows, _SF["video_id"]])
            prio[at] = np.where(found, schema.RANK_POS_BASE - rk, MISSING_RANK_PRIORITY)
            counts["rank_pos_missing_rank_index"] += int((~found).sum())
            counts["requests_without_rank_pos"] += int((where[g][1] == 0).sum())
        else:
            prio[at] = schema.GROUP_PRIORITY[g]
        counts[f"slots_{g}"] += int(r_i.size)
    slots = np.flatnonzero(pos >= 0)  # the valid slots, in row-major order
    rows = pos[slots]
    mask = pos >= 0

    def slot_values(values: np.ndarray) -> np.ndarray:  # (len(slots),) -> (R * N,), 0 = padding
        out = np.zeros(R * N, dtype=np.int64)
        out[slots] = values
        return out

    for f in _ID_ITEM_FIELDS:
        v = flat[rows, _SF[f]]
        _check_ids(v, f, vocab, r_path)
        cols[schema.cand_col(f)] = _fixed_list(slot_values(v + 1), N)
    # Time features of the valid slots only (padding would force the slow tz path).
    tf = time_features(_upload_seconds(flat[rows, _SF["upload_timestamp"]]), "s")
    for f, g in zip(_UPLOAD_FIELDS, ("weekday", "hour", "minute")):
        cols[schema.cand_col(f)] = _fixed_list(slot_values(tf[g]), N)
    cols[schema.CAND_MASK] = _fixed_list(mask, N)
    cols[schema.CAND_PRIORITY] = _fixed_list(prio, N)

    # Item corpus (every stage, every item of these requests).
    items.add_stage_rows(flat)
    return pa.table({c: cols[c] for c in schema.REQUEST_COLUMNS})


def _prefetch(*paths: Path) -> None:
    """Ask the kernel to start reading the pickles (read whole, later) while all_stage is scanned;
    a no-op where posix_fadvise is unavailable."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)


@contextlib.contextmanager
def _gc_paused():
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


def _convert_day(src: Path, day: str, vocab: dict[str, int], tmp: Path) -> dict:
    with _gc_paused():
        return _convert_day_inner(src, day, vocab, tmp)


def _convert_day_inner(src: Path, day: str, vocab: dict[str, int], tmp: Path) -> dict:
    """Convert one day into ``tmp`` (requests/ + items.parquet + counts.json); returns counts.

    Bounded memory: all_stage is scanned batch by batch for the needed columns only; the two
    pickles are loaded once (request_id_dict with its arrays kept as raw bytes), then requests
    are converted in chunks of CHUNK_REQUESTS, each chunk's dict entries freed as it is done,
    and every ROW_GROUP_REQUESTS rows are written as a parquet row group at once."""
    a_path = src / "all_stage" / f"{day}.feather"
    r_path = src / "request_id_dict" / f"{day}.pkl"
    q_path = src / "seq_effective_50_dict" / f"{day}.pkl"

    _prefetch(r_path, q_path)
    req, rp = _scan_all_stage(a_path)

    rid_dict = _load_raw_pickle(r_path)
    stages: set = set()
    for d in rid_dict.values():
        stages.update(d.keys())
    unknown = stages - set(schema.RAW_STAGES)
    if unknown:
        k = sorted(map(str, unknown))[0]
        who = next(r for r, d in rid_dict.items() if k in map(str, d.keys()))
        raise ValueError(
            f"{r_path}: unknown stage key {k!r} (request {who}); known: {list(schema.RAW_STAGES)}"
        )
    dict_ids = np.fromiter(rid_dict.keys(), dtype=np.int64, count=len(rid_dict))
    all_ids = req["request_id"].astype(np.int64, copy=False)
    ids_np = np.intersect1d(dict_ids, all_ids)  # sorted
    R = ids_np.size
    counts: dict = {
        "requests": R,
        "requests_only_in_all_stage": int(all_ids.size - R),
        "requests_only_in_request_id_dict": int(dict_ids.size - R),
    }
    del dict_ids
    keep = np.isin(all_ids, ids_np)
    req = {c: v[keep] for c, v in req.items()}  # rows of ids_np, same (sorted) order
    rank = _RankLookup(rp, ids_np, vocab["video_id"])
    del rp, keep

    seq_dict = _load_raw_pickle(q_path)
    items = _ItemCorpus(vocab, r_path)
    zero_keys = (
        "requests_missing_seq",
        "requests_empty_seq",
        "rank_pos_missing_rank_index",
        *(f"slots_{g}" for g in schema.CAND_GROUPS),
        "requests_without_rank_pos",
    )
    for k in zero_keys:
        counts[k] = 0  # the previous converter's key order
    (tmp / "requests").mkdir(parents=True)
    writer, part, pending, group = None, -1, None, []
    # Parquet encoding releases the GIL: row group k is written on a thread while the next one
    # is built (at most one in flight, so memory stays bounded).
    with ThreadPoolExecutor(1) as pool:
        try:
            for lo in range(0, max(R, 1), CHUNK_REQUESTS):
                hi = min(R, lo + CHUNK_REQUESTS)
                group.append(
                    _chunk_table(
                        ids_np[lo:hi], lo, {c: v[lo:hi] for c, v in req.items()}, rid_dict,
                        seq_dict, rank, items, vocab, (a_path, r_path, q_path), counts,
                    )
                )  # fmt: skip
                if hi % ROW_GROUP_REQUESTS and hi < R:
                    continue
                table = pa.concat_tables(group)
                first = hi - table.num_rows  # the row group's first request
                group = []
                if pending is not None:
                    pending.result()
                if first // ROWS_PER_PART != part:  # a new part file every ROWS_PER_PART
                    if writer is not None:
                        writer.close()
                    part = first // ROWS_PER_PART
                    path = tmp / "requests" / f"part-{part:05d}.parquet"
                    writer = pq.ParquetWriter(path, table.schema)
                pending = pool.submit(writer.write_table, table)
            if pending is not None:
                pending.result()
        finally:
            if pending is not None:
                pending.exception()  # wait for it either way before closing
            if writer is not None:
                writer.close()
    del rid_dict, seq_dict

    items_raw = items.rows()
    counts["items"] = int(items_raw.shape[0])
    pq.write_table(_items_table(items_raw), tmp / "items.parquet")
    (tmp / "counts.json").write_text(json.dumps(counts, indent=1))
    return counts


# ---- public API ------------------------------------------------------------------------------
def _rename_into(tmp: Path, final: Path, overwrite: bool) -> None:
    if final.exists() and overwrite:
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished this day first


def _day_done(out: Path, day: str) -> bool:
    return (out / "requests" / f"day={day}").is_dir() and (
        out / "_per_day" / day / "counts.json"
    ).is_file()


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    days: list[str] | None = None,
    overwrite: bool = False,
    strict: bool = False,
) -> dict:
    """Convert the RecFlow layout at ``src`` into the parquet dataset at ``out``.

    days: "YYYY-MM-DD" strings (default: every day found). Days already converted are skipped
    unless ``overwrite``. A day lacking one of its files (RecFlow's public copy lacks some) is
    not converted: every complete day is, and the incomplete ones are returned under
    "days_incomplete" ({day: missing files}) and recorded in meta.json; with ``strict`` a
    ValueError naming them all is raised after the complete days are converted. Returns the
    counts (also written to OUT/meta.json): totals, per-day counts, and the days
    converted/skipped by this call. Raises ValueError naming the file and field on invalid input.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"'src' should be a RecFlow directory but got {str(src)!r}")
    vocab = _vocab(_read_id_cnt(src))
    wanted, incomplete = _discover_days(src, list(days) if days is not None else None)
    (out / "requests").mkdir(parents=True, exist_ok=True)
    (out / "_per_day").mkdir(exist_ok=True)
    done, skipped = [], []
    for day in wanted:
        if _day_done(out, day) and not overwrite:
            skipped.append(day)
            continue
        tmp = out / f".tmp-{day}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _convert_day(src, day, vocab, tmp)
            # Side outputs first: the day counts as done only once requests/day=D exists.
            side = tmp / "side"
            side.mkdir()
            for name in ("items.parquet", "counts.json"):
                os.rename(tmp / name, side / name)
            _rename_into(side, out / "_per_day" / day, overwrite=True)
            _rename_into(tmp / "requests", out / "requests" / f"day={day}", overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        done.append(day)

    present = sorted(
        p.name[4:] for p in (out / "requests").glob("day=*") if _day_done(out, p.name[4:])
    )
    per_day = {d: json.loads((out / "_per_day" / d / "counts.json").read_text()) for d in present}
    items = None
    for d in present:  # merge day corpora, bounded by the corpus size
        t = pq.read_table(out / "_per_day" / d / "items.parquet").to_pandas()
        items = t if items is None else pd.concat([items, t], ignore_index=True)
        items = items.drop_duplicates("video_id", keep="first")
    if items is None:
        items = pd.DataFrame({c: np.zeros(0, np.int64) for c in schema.ITEM_TABLE_COLUMNS})
    items = items.sort_values("video_id")
    items_tbl = pa.Table.from_pandas(items[list(schema.ITEM_TABLE_COLUMNS)], preserve_index=False)
    tmp_items = out / f".items.{os.getpid()}.{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(items_tbl, tmp_items)
    os.replace(tmp_items, out / "items.parquet")

    counts = {
        "requests": sum(c["requests"] for c in per_day.values()),
        "requests_per_day": {d: c["requests"] for d, c in per_day.items()},
        "rank_pos_missing_rank_index": sum(
            c["rank_pos_missing_rank_index"] for c in per_day.values()
        ),
        "per_day": per_day,
    }
    meta = {
        "schema_version": schema.SCHEMA_VERSION,
        "vocab": vocab,
        "days": present,
        "counts": counts,
        "num_items": int(items_tbl.num_rows),
        "source": str(src.resolve()),
        "days_incomplete": incomplete,  # of the last convert call: {day: missing files}
    }
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    if incomplete and strict:
        raise ValueError(incomplete_message(src, incomplete))
    return {
        **counts,
        "days_converted": done,
        "days_skipped": skipped,
        "days_incomplete": incomplete,
    }


def read_meta(path: str | os.PathLike) -> dict:
    """OUT/meta.json of a converted dataset (``path`` = OUT or the meta.json file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "meta.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read meta.json ({type(e).__name__}: {e})") from e
    for key in ("schema_version", "vocab", "days", "counts", "num_items"):
        if key not in meta:
            raise ValueError(f"{p}: key {key!r} missing")
    if meta["schema_version"] != schema.SCHEMA_VERSION:
        raise ValueError(
            f"{p}: schema_version {meta['schema_version']} != {schema.SCHEMA_VERSION}; re-convert"
        )
    return meta
