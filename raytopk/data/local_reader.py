"""The pipeline's transforms without Ray: one process reads a day's parquet and yields the very
batches the Ray Data pipeline yields to a single worker (``run.backend: local``).

Notation: B = requests per batch (= one sampling group), N = 40 + n candidates per request.

Same pure pieces as ``raytopk.data.pipeline``, in the same order: read the day's files (only
schema.REQUEST_COLUMNS), ``add_shuffle_key`` (which also narrows the ids) and a sort by that key
for training, ``narrow`` in file order for evaluation; cut into consecutive groups of B requests;
``prepare_group`` (in-batch negatives, seeded by the group); ``collate``. The sort key is unique
per request, so a stable sort gives Ray's order, and the group seeds depend only on the group's
rows: a 1-worker Ray run and a local run train on identical batches.

A background thread prepares up to ``prefetch`` batches ahead (pinned when the consumer is a CUDA
device), so data preparation overlaps the training step as Ray Data's prefetching does.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch, collate
from raytopk.data.pipeline import (
    _DAY,
    _KEY,
    _read_meta,
    add_shuffle_key,
    day_files,
    narrow,
    prepare_group,
    storage_types,
)

__all__ = ["iter_local_groups", "prefetched"]


def _read_day(path: str | os.PathLike, day: str, limit: int = 0) -> pa.Table:
    """The day's requests in file order; ``limit`` > 0: only the first that many, reading row
    group by row group no further than needed (a capped evaluation reads what it scores)."""
    cols = list(schema.REQUEST_COLUMNS)
    parts, rows = [], 0
    for f in day_files(path, day):
        if not limit:
            parts.append(pq.read_table(f, columns=cols))
            continue
        for batch in pq.ParquetFile(f).iter_batches(columns=cols):
            parts.append(pa.Table.from_batches([batch]))
            rows += batch.num_rows
            if rows >= limit:
                break
        if rows >= limit:
            break
    table = pa.concat_tables(parts)
    if limit:
        table = table.slice(0, limit)
    return table.append_column(_DAY, pa.array([day] * table.num_rows, type=pa.string()))


def iter_local_groups(
    path: str | os.PathLike,
    days: Sequence[str],
    *,
    train: bool,
    sample_num: int,
    batch_size: int,
    seed: int,
    max_requests: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """numpy batches (one sampling group each) of ``days`` in date order: shuffled within each
    day with ``sample_num`` negatives when ``train``, else in file order with
    schema.EVAL_SAMPLE_NUM negatives (``max_requests`` > 0: only the first that many)."""
    _, meta = _read_meta(path)
    types = storage_types(meta["vocab"])
    limit = 0 if train else max_requests
    tables = [_read_day(path, day, limit) for day in sorted(days)]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if train:
        table = add_shuffle_key(table, seed=seed, types=types)
        order = np.argsort(table.column(_KEY).to_numpy(), kind="stable")
        table = table.take(pa.array(order))
    else:
        sample_num = schema.EVAL_SAMPLE_NUM
        table = narrow(table.drop_columns([_DAY]), types)
        if max_requests:
            table = table.slice(0, max_requests)
    for start in range(0, table.num_rows, batch_size):
        yield prepare_group(table.slice(start, batch_size), sample_num=sample_num, seed=seed)


def prefetched(
    groups: Iterator[dict[str, np.ndarray]], prefetch: int, pin: bool = False
) -> Iterator[CascadeBatch]:
    """CascadeBatches of ``groups``, prepared by a background thread up to ``prefetch`` ahead
    (``pin``: in page-locked memory, for non-blocking copies to a CUDA device)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        """Queue ``item`` unless the consumer stopped (then False): never blocks for good on a
        full queue that nobody drains any more."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for g in groups:
                batch = collate(g)
                if pin:
                    batch = batch.pin_memory()
                if not put(batch):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer's thread
            put(e)

    thread = threading.Thread(target=produce, daemon=True, name="raytopk-local-data")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # A consumer that stops early (budget, cap) releases the producer, and waits for it: a
        # thread still inside torch when the interpreter exits can abort the process.
        stop.set()
        thread.join(timeout=60)
