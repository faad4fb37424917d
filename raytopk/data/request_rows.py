"""Building the converter's output rows from one chunk of raw requests, vectorised over the chunk
(docs/protocol.md §4.2–4.3): time features (Asia/Shanghai), candidate slots in group order with
masks and priorities (rank_index looked up per (request, video)), the behaviour sequence, and the
item corpus seen on the way.
"""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa

from raytopk.data import schema
from raytopk.data.raw import RawArray, as_array, check_ids, check_range

__all__ = [
    "MISSING_RANK_PRIORITY",
    "ItemCorpus",
    "RankLookup",
    "chunk_table",
    "items_table",
    "time_features",
]

MISSING_RANK_PRIORITY = schema.GROUP_PRIORITY["rank_neg"] + 1.0
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



class RankLookup:
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
            if type(v) is RawArray and v.cols == F:
                n = v.shape[0]
                pieces.append(v.data)
            elif len(v) == 0:
                continue
            else:
                a = as_array(v)
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


class ItemCorpus:
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
            check_range(int(lo[j]), int(hi[j]), f, self.vocab, self.r_path)
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


def items_table(raw_items: np.ndarray) -> pa.Table:
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
        elif type(v) is RawArray and v.cols == QF and v.shape[0] == L:
            pieces.append(v.data)
        else:
            a = as_array(v)
            if a.shape != (L, QF):
                raise ValueError(
                    f"{q_path}: sequences have shape {a.shape}, want ({L}, {QF}) (request {r})"
                )
            pieces.append(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return np.frombuffer(b"".join(pieces), dtype=np.int64).reshape(len(ids), L, QF), missing


def chunk_table(
    ids_np: np.ndarray,  # this chunk's request ids (sorted)
    lo: int,
    req: dict[str, np.ndarray],
    rid_dict: dict,
    seq_dict: dict,
    rank: RankLookup,
    items: ItemCorpus,
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
        check_ids(raw, f, vocab, a_path)
        cols[f] = pa.array(raw + 1, pa.int64())

    # Behaviour sequence: left-padded (50, 10); a row is padding iff time_ms == 0.
    L = schema.SEQ_LEN
    seq_raw, missing_seq = _seq_block(seq_dict, ids, q_path)
    for r in ids:
        seq_dict.pop(r, None)
    seq_mask = seq_raw[:, :, _QF["time_ms"]] != 0
    valid_steps = seq_raw[seq_mask]  # (n, 10)
    for f in schema.SEQ_FIELDS:
        check_ids(valid_steps[:, _QF[f]], f, vocab, q_path)
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
        check_ids(v, f, vocab, r_path)
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

