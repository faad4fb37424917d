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
A day lacking one of its three files is not converted; the others are, and the incomplete ones
are reported (``days_incomplete``; an error only with ``strict``). Requests kept are those in
both all_stage (user features, timestamp) and request_id_dict (candidates); the others are
dropped and counted. A request missing from the sequence pickle gets an empty sequence (counted).
The realshow/ folder is not needed and not read.

Memory and speed (a real RecFlow day: ~250K requests, ~50M all_stage rows, ~4.4 GB of pickles):
all_stage is read one record batch at a time, decoding only the 10 columns used; the pickles are
loaded once, request_id_dict's arrays kept as their raw bytes (RawArray); requests are then
converted CHUNK_REQUESTS at a time, vectorised over the chunk, their dictionary entries freed,
and every ROW_GROUP_REQUESTS rows written as a parquet row group on a writer thread. Peak memory
is about the two pickles' payload plus a few chunks (~5 GB for a real-density day). The output
is the same, row for row and value for value, as the previous whole-day converter's
(tests/unit/convert_v1_oracle.py, compared in tests/unit/test_convert_scale.py).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raytopk.data import schema
from raytopk.data.raw import (
    discover_days,
    gc_paused,
    incomplete_message,
    load_raw_pickle,
    prefetch_files,
    read_id_cnt,
    scan_all_stage,
    vocab_from_id_cnt,
)
from raytopk.data.request_rows import (
    MISSING_RANK_PRIORITY,
    ItemCorpus,
    RankLookup,
    chunk_table,
    items_table,
    time_features,
)
from raytopk.progress import Progress

__all__ = [
    "NotADataset",
    "convert",
    "read_meta",
    "missing_days",
    "incomplete_message",
    "time_features",
    "MISSING_RANK_PRIORITY",
]

ROWS_PER_PART = 100_000  # requests per parquet file
ROW_GROUP_REQUESTS = 10_000  # requests per parquet row group, written as soon as it is ready
# Requests converted at once. Small enough that a chunk's buffers (~30 MB at real density) stay
# under glibc's largest mmap threshold and are reused from the heap rather than page-faulted in
# afresh for every chunk (a third fewer page faults than chunks of 10,000).
CHUNK_REQUESTS = 2_500
assert ROWS_PER_PART % ROW_GROUP_REQUESTS == 0 and ROW_GROUP_REQUESTS % CHUNK_REQUESTS == 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def missing_days(meta_or_path: dict | str | os.PathLike, wanted_days: list[str]) -> list[str]:
    """The days of ``wanted_days`` ("YYYY-MM-DD", ranges already expanded) absent from a
    converted dataset, in the order given. ``meta_or_path``: read_meta's dict, the dataset
    directory or its meta.json. Pure (reads meta.json only): the training driver can call it
    before any worker starts and name the missing days."""
    meta = meta_or_path if isinstance(meta_or_path, dict) else read_meta(meta_or_path)
    present = set(meta["days"])
    return [d for d in wanted_days if d not in present]


def _convert_day(src: Path, day: str, vocab: dict[str, int], tmp: Path) -> dict:
    with gc_paused():
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

    prefetch_files(r_path, q_path)
    req, rp = scan_all_stage(a_path)

    rid_dict = load_raw_pickle(r_path)
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
    rank = RankLookup(rp, ids_np, vocab["video_id"])
    del rp, keep

    seq_dict = load_raw_pickle(q_path)
    items = ItemCorpus(vocab, r_path)
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
                    chunk_table(
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
    pq.write_table(items_table(items_raw), tmp / "items.parquet")
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
    vocab = vocab_from_id_cnt(read_id_cnt(src))
    wanted, incomplete = discover_days(src, list(days) if days is not None else None)
    (out / "requests").mkdir(parents=True, exist_ok=True)
    (out / "_per_day").mkdir(exist_ok=True)
    done, skipped = [], []
    progress = Progress(f"converting into {out}", len(wanted), "days")
    for day in wanted:
        if _day_done(out, day) and not overwrite:
            skipped.append(day)
            progress.advance()
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
        progress.advance()
    progress.done()

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


class NotADataset(FileNotFoundError, ValueError):
    """A path that should be a converted dataset is absent or has no meta.json: a missing file
    and a bad argument at once, so callers catching either convention see it."""


def read_meta(path: str | os.PathLike, what: str = "path") -> dict:
    """OUT/meta.json of a converted dataset (``path`` = OUT or the meta.json file itself): the
    one reader of it. Errors name ``what`` (the argument or config key that gave the path):
    :class:`NotADataset` when the path or its meta.json is absent, ValueError when meta.json is
    unreadable, lacks a key or has another schema version."""
    p = Path(path)
    if not p.exists():
        raise NotADataset(
            f"{what} {str(p)!r} does not exist: convert RecFlow with "
            "`python jobs/prepare_data.py convert ...` (or set data.synthetic.enabled=true)"
        )
    if p.is_dir():
        if not (p / "meta.json").is_file():
            raise NotADataset(
                f"{what} {str(p)!r} has no meta.json: it is not a converted raytopk dataset "
                "(point it at the output directory of `jobs/prepare_data.py convert`)"
            )
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
