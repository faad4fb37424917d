"""One iterator of CascadeBatches, from a Ray dataset (or a Train worker's shard of it) or from
the local backend's reader (raytopk.data.local_reader).

Training, evaluation and the data benchmark all read batches through :class:`CascadeBatches`,
so the benchmark measures the iterator training uses.

Batches are read with the batch size the dataset was built with, so each one is exactly one
sampling group (raytopk.data.pipeline: each batch's negatives come from that very batch).
numpy -> ``CascadeBatch`` (``collate``) runs in Ray Data's prefetch threads, off the training
thread; with ``pin`` (a CUDA consumer) the batch is also copied into page-locked memory there, so
the training thread's ``batch.to(device, non_blocking=True)`` is an asynchronous DMA. (Ray's own
``iter_torch_batches(pin_memory=True)`` pins only tensor/dict/tuple outputs of the collate
function, not a dataclass.) ``wait`` accumulates the seconds the consumer spent blocked in
``next()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from raytopk.data.batch import CascadeBatch, collate

__all__ = ["CascadeBatches"]


class CascadeBatches:
    """Iterate ``source`` (a ``ray.data.Dataset`` or a ``DataIterator`` shard, or a function
    that opens an iterator of CascadeBatches) as CascadeBatches, timing how long the consumer
    waits for each.

    ``warm_async()`` starts the execution in a background thread and holds its first batch: each
    training day is its own dataset, and starting one (split coordinator, read, sort) costs
    seconds that would otherwise be idle time at every day boundary. The loop warms the next day
    while the current one trains.

    ``max_batches`` (> 0) stops after that many batches. ``pin``: a Ray source's batches are
    pinned in Ray's collate threads (a function source pins its own, see raytopk.data.local_reader).
    """

    def __init__(
        self,
        source: Any | Callable[[], Iterator[CascadeBatch]],
        batch_size: int = 0,
        prefetch: int = 2,
        *,
        max_batches: int = 0,
        pin: bool = False,
    ) -> None:
        self._source, self._batch_size, self._prefetch = source, batch_size, prefetch
        self._pin = pin
        self._max = max_batches
        self._count = 0
        self._it: Iterator[CascadeBatch] | None = None
        self._first: list[Any] = []  # [batch] or [StopIteration()] once warmed
        self._thread: threading.Thread | None = None
        self.wait = 0.0

    def _open(self) -> Iterator[CascadeBatch]:
        if callable(self._source):
            return iter(self._source())
        from ray.data.collate_fn import NumpyBatchCollateFn

        pin = self._pin

        class _Collate(NumpyBatchCollateFn):
            # Runs in Ray Data's prefetch threads: numpy -> CascadeBatch off the training thread.
            def __call__(self, batch: dict[str, np.ndarray]) -> CascadeBatch:
                out = collate(batch)
                return out.pin_memory() if pin else out

        return iter(
            self._source.iter_torch_batches(
                batch_size=self._batch_size,
                prefetch_batches=self._prefetch,
                collate_fn=_Collate(),
                drop_last=False,
            )
        )

    def _warm(self) -> None:
        try:
            self._it = self._open()
            self._first.append(next(self._it))
        except BaseException as e:  # StopIteration (empty shard) or a real error: re-raised
            self._first.append(e)  # in the consumer's thread by __next__

    def warm_async(self) -> CascadeBatches:
        if self._thread is None and self._it is None:
            self._thread = threading.Thread(target=self._warm, daemon=True, name="raytopk-warm")
            self._thread.start()
        return self

    def __iter__(self) -> Iterator[CascadeBatch]:
        return self

    def close(self) -> None:
        """Release the source early (a cap or a budget reached): its prefetching stops."""
        if self._thread is not None:  # a warm-up still opening the source: let it finish
            self._thread.join()
            self._thread = None
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __next__(self) -> CascadeBatch:
        if self._max and self._count >= self._max:
            self.close()
            raise StopIteration
        t = time.perf_counter()
        try:
            batch = self._next()
        finally:
            self.wait += time.perf_counter() - t
        self._count += 1
        return batch

    def _next(self) -> CascadeBatch:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._first:
                item = self._first.pop()
                if isinstance(item, BaseException):
                    raise item
                return item
        if self._it is None:
            self._it = self._open()
        return next(self._it)
