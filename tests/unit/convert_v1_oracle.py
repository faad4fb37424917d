# Frozen copy of raytopk/data/convert.py as of commit cd18c90, before the bounded-memory rewrite:
# the oracle that tests/unit/test_convert_scale.py compares the converter with. Do not edit
# (only its docstrings' citations were since pointed at docs/protocol.md).
"""RecFlow raw layout (docs/protocol.md §4.1) -> the per-request parquet dataset training reads.

RecFlow: Liu et al., "RecFlow: An Industrial Full Flow Recommendation Dataset", ICLR 2025.
One output row per request (docs/protocol.md §4.2): time features of request_timestamp in
Asia/Shanghai, user features, the 50-step behaviour sequence + mask, and N = 40 candidate slots in
group order rank_pos, rank_neg, coarse_neg, prerank_neg (the first <= 10 items of each stage of
request_id_dict, in stored order), with per-slot mask and ground-truth priority
(docs/protocol.md §4.3)

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
Requests kept are those in both all_stage (user features, timestamp) and request_id_dict
(candidates); the others are dropped and counted. A request missing from the sequence pickle gets
an empty sequence (counted). The realshow/ folder is not needed and not read.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from raytopk.data import schema

__all__ = ["convert", "read_meta", "time_features", "MISSING_RANK_PRIORITY"]

MISSING_RANK_PRIORITY = schema.GROUP_PRIORITY["rank_neg"] + 1.0
ROWS_PER_PART = 100_000  # requests per parquet file
_ITEM_CHUNK = 16_384  # requests per chunk when collecting a day's item corpus
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
def time_features(ts: np.ndarray, unit: str) -> dict[str, np.ndarray]:
    """Stored weekday/hour/minute (value + 1; Monday = 0) of epoch timestamps in Asia/Shanghai."""
    ts = np.asarray(ts, dtype=np.int64)
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


def _discover_days(src: Path, days: list[str] | None) -> list[str]:
    found = {}
    for folder, ext in _NEEDED_FOLDERS.items():
        if not (src / folder).is_dir():
            raise ValueError(f"{src / folder}: folder missing from the RecFlow layout")
        found[folder] = _days_in(src / folder, ext)
    wanted = set().union(*found.values()) if days is None else set(days)
    for day in sorted(wanted):
        for folder, ext in _NEEDED_FOLDERS.items():
            if day not in found[folder]:
                raise ValueError(
                    f"{src / folder / (day + ext)}: day {day} missing from {folder}/ "
                    f"(present in {[f for f in found if day in found[f]]})"
                )
    if not wanted:
        raise ValueError(f"{src}: no days found in {list(_NEEDED_FOLDERS)}")
    return sorted(wanted)


# ---- one day ---------------------------------------------------------------------------------
def _gather_group(
    rid_dict: dict, ids: list, stage: str, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """First <= GROUP_SIZE items of ``stage`` per request -> raw (R, 10, 8) and counts (R,)."""
    G, F = schema.GROUP_SIZE, len(schema.RAW_STAGE_ITEM_FIELDS)
    empty = np.zeros((0, F), dtype=np.int64)
    parts = [rid_dict[r].get(stage, empty)[:G] for r in ids]
    lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    out = np.zeros((len(ids), G, F), dtype=np.int64)
    if lens.sum() == 0:
        return out, lens
    try:
        flat = np.concatenate([p for p in parts if len(p)]).astype(np.int64, copy=False)
    except ValueError as e:
        raise ValueError(f"{path}: stage {stage!r} arrays are not (n, {F}) ({e})") from e
    if flat.ndim != 2 or flat.shape[1] != F:
        raise ValueError(
            f"{path}: stage {stage!r} arrays have shape (n, {flat.shape[1:]}), want (n, {F})"
        )
    row = np.repeat(np.arange(len(ids)), lens)
    col = np.arange(flat.shape[0]) - np.repeat(np.cumsum(lens) - lens, lens)
    out[row, col] = flat
    return out, lens


def _day_items(
    rid_dict: dict, ids: list, seq_raw: np.ndarray, seq_mask: np.ndarray, vocab: dict, where: Path
) -> np.ndarray:
    """Unique raw (video_id, author, cat2, cat1, upload_type, upload_s) of every item of the day:
    all stages of request_id_dict first, then behaviour-sequence items not seen there.

    Ids are validated chunk by chunk; a seen-bitmap over the video vocabulary keeps the per-chunk
    de-duplication to the few items not met before (O(n), not a sort of every stage sample)."""
    F = len(schema.RAW_STAGE_ITEM_FIELDS)
    seen = np.zeros(vocab["video_id"], dtype=bool)
    tables = []

    def add(rows: np.ndarray) -> None:
        for j, f in enumerate(_ID_ITEM_FIELDS):
            _check_ids(rows[:, j], f, vocab, where)
        rows = rows[~seen[rows[:, 0]]]
        if rows.size:
            _, first = np.unique(rows[:, 0], return_index=True)
            rows = rows[np.sort(first)]
            seen[rows[:, 0]] = True
            tables.append(rows)

    cols = [_SF[f] for f in _ID_ITEM_FIELDS] + [_SF["upload_timestamp"]]
    for lo in range(0, len(ids), _ITEM_CHUNK):
        parts = [a for r in ids[lo : lo + _ITEM_CHUNK] for a in rid_dict[r].values() if len(a)]
        if parts:
            add(np.concatenate(parts).reshape(-1, F)[:, cols].astype(np.int64, copy=False))
    qcols = [_QF[f] for f in _ID_ITEM_FIELDS] + [_QF["upload_time"]]
    add(seq_raw[seq_mask][:, qcols])
    return np.concatenate(tables) if tables else np.zeros((0, 6), dtype=np.int64)


def _items_table(raw_items: np.ndarray) -> pa.Table:
    """Raw item rows -> stored item table (schema.ITEM_TABLE_COLUMNS)."""
    cols = {f: raw_items[:, j] + 1 for j, f in enumerate(_ID_ITEM_FIELDS)}
    tf = time_features(_upload_seconds(raw_items[:, 5]), "s")
    for f, g in zip(_UPLOAD_FIELDS, ("weekday", "hour", "minute")):
        cols[f] = tf[g]
    return pa.table({f: pa.array(cols[f], pa.int64()) for f in schema.ITEM_TABLE_COLUMNS})


def _convert_day(src: Path, day: str, vocab: dict[str, int], tmp: Path) -> dict:
    """Convert one day into ``tmp`` (requests/ + items.parquet + counts.json); returns counts."""
    a_path = src / "all_stage" / f"{day}.feather"
    r_path = src / "request_id_dict" / f"{day}.pkl"
    q_path = src / "seq_effective_50_dict" / f"{day}.pkl"

    # all_stage: request features + the rank_pos rank index.
    tbl = _read_feather(a_path, _ALL_STAGE_NEEDED)
    df = tbl.to_pandas()
    for c in ("request_id", "request_timestamp", *schema.USER_FIELDS, "video_id"):
        if df[c].isna().any():
            raise ValueError(f"{a_path}: column {c!r} has missing values")
    req_df = df.drop_duplicates("request_id")[
        ["request_id", "request_timestamp", *schema.USER_FIELDS]
    ].sort_values("request_id")
    rp = df[df["rank_pos"] == 1][["request_id", "video_id", "rank_index"]]
    rp = rp[rp["rank_index"].notna() & (rp["rank_index"] >= 0)]
    rp = rp.drop_duplicates(["request_id", "video_id"])
    del df, tbl

    rid_dict = _load_pickle(r_path)
    seq_dict = _load_pickle(q_path)
    stages = set().union(*(d.keys() for d in rid_dict.values())) if rid_dict else set()
    unknown = stages - set(schema.RAW_STAGES)
    if unknown:
        k = sorted(map(str, unknown))[0]
        who = next(r for r, d in rid_dict.items() if k in map(str, d.keys()))
        raise ValueError(
            f"{r_path}: unknown stage key {k!r} (request {who}); known: {list(schema.RAW_STAGES)}"
        )

    dict_ids = np.fromiter(rid_dict.keys(), dtype=np.int64, count=len(rid_dict))
    all_ids = req_df["request_id"].to_numpy(np.int64)
    ids_np = np.intersect1d(dict_ids, all_ids)  # sorted
    ids = ids_np.tolist()
    R = len(ids)
    counts: dict = {
        "requests": R,
        "requests_only_in_all_stage": int(all_ids.size - R),
        "requests_only_in_request_id_dict": int(dict_ids.size - R),
    }

    # Request-level features.
    req = req_df.set_index("request_id").loc[ids_np]
    cols: dict[str, pa.Array] = {schema.REQUEST_ID: pa.array(ids_np, pa.int64())}
    tf = time_features(req["request_timestamp"].to_numpy(np.int64), "ms")
    for f in schema.CONTEXT_FIELDS:
        cols[f] = pa.array(tf[f], pa.int64())
    for f in schema.USER_FIELDS:
        raw = req[f].to_numpy(np.int64)
        _check_ids(raw, f, vocab, a_path)
        cols[f] = pa.array(raw + 1, pa.int64())

    # Behaviour sequence: left-padded (50, 10); a row is padding iff time_ms == 0.
    L, QF = schema.SEQ_LEN, len(schema.RAW_SEQ_FIELDS)
    zero = np.zeros((L, QF), dtype=np.int64)
    missing_seq = sum(1 for r in ids if r not in seq_dict)
    try:
        seq_raw = np.stack([seq_dict.get(r, zero) for r in ids]).astype(np.int64, copy=False)
    except ValueError as e:
        raise ValueError(f"{q_path}: sequences are not all ({L}, {QF}) arrays ({e})") from e
    if R and seq_raw.shape[1:] != (L, QF):
        raise ValueError(f"{q_path}: sequences have shape {seq_raw.shape[1:]}, want ({L}, {QF})")
    if not R:
        seq_raw = np.zeros((0, L, QF), dtype=np.int64)
    seq_mask = seq_raw[:, :, _QF["time_ms"]] != 0
    for f in schema.SEQ_FIELDS:
        raw = seq_raw[:, :, _QF[f]]
        _check_ids(raw[seq_mask], f, vocab, q_path)
        cols[schema.seq_col(f)] = _fixed_list(np.where(seq_mask, raw + 1, 0), L)
    cols[schema.SEQ_MASK] = _fixed_list(seq_mask, L)
    counts["requests_missing_seq"] = missing_seq
    counts["requests_empty_seq"] = int((~seq_mask.any(1)).sum())

    # Candidates: 4 groups x 10 slots.
    G = schema.GROUP_SIZE
    raws, masks, prios = [], [], []
    for g in schema.CAND_GROUPS:
        raw, lens = _gather_group(rid_dict, ids, g, r_path)
        mask = np.arange(G)[None, :] < lens[:, None]
        if g == "rank_pos":
            r_i, c_i = np.nonzero(mask)
            probe = pd.DataFrame(
                {"request_id": ids_np[r_i], "video_id": raw[r_i, c_i, _SF["video_id"]]}
            )
            hit = probe.merge(rp, on=["request_id", "video_id"], how="left")["rank_index"]
            found = hit.notna().to_numpy()
            pr = np.where(
                found,
                schema.RANK_POS_BASE - hit.fillna(0).to_numpy(np.float64),
                MISSING_RANK_PRIORITY,
            )
            prio = np.zeros((R, G), dtype=np.float32)
            prio[r_i, c_i] = pr
            counts["rank_pos_missing_rank_index"] = int((~found).sum())
        else:
            prio = np.where(mask, schema.GROUP_PRIORITY[g], 0.0).astype(np.float32)
        counts[f"slots_{g}"] = int(mask.sum())
        raws.append(raw)
        masks.append(mask)
        prios.append(prio)
    raw = np.concatenate(raws, axis=1)  # (R, 40, 8)
    mask = np.concatenate(masks, axis=1)  # (R, 40)
    N = schema.N_OWN
    for f in _ID_ITEM_FIELDS:
        v = raw[:, :, _SF[f]]
        _check_ids(v[mask], f, vocab, r_path)
        cols[schema.cand_col(f)] = _fixed_list(np.where(mask, v + 1, 0), N)
    tf = time_features(_upload_seconds(raw[:, :, _SF["upload_timestamp"]].reshape(-1)), "s")
    for f, g in zip(_UPLOAD_FIELDS, ("weekday", "hour", "minute")):
        cols[schema.cand_col(f)] = _fixed_list(np.where(mask, tf[g].reshape(R, N), 0), N)
    cols[schema.CAND_MASK] = _fixed_list(mask, N)
    cols[schema.CAND_PRIORITY] = _fixed_list(np.concatenate(prios, axis=1), N)
    counts["requests_without_rank_pos"] = int((~masks[0].any(1)).sum())

    # Item corpus of the day (every stage, every item, plus sequence items).
    items_raw = _day_items(rid_dict, ids, seq_raw, seq_mask, vocab, r_path)
    counts["items"] = int(items_raw.shape[0])

    table = pa.table({c: cols[c] for c in schema.REQUEST_COLUMNS})
    (tmp / "requests").mkdir(parents=True)
    for k, lo in enumerate(range(0, max(R, 1), ROWS_PER_PART)):
        pq.write_table(table.slice(lo, ROWS_PER_PART), tmp / "requests" / f"part-{k:05d}.parquet")
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
) -> dict:
    """Convert the RecFlow layout at ``src`` into the parquet dataset at ``out``.

    days: "YYYY-MM-DD" strings (default: every day found). Days already converted are skipped
    unless ``overwrite``. Returns the counts (also written to OUT/meta.json): totals, per-day
    counts, and the days converted/skipped by this call. Raises ValueError naming the file and
    field on invalid input.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"'src' should be a RecFlow directory but got {str(src)!r}")
    vocab = _vocab(_read_id_cnt(src))
    wanted = _discover_days(src, list(days) if days is not None else None)
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
    }
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    return {**counts, "days_converted": done, "days_skipped": skipped}


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
