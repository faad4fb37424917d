"""In-batch negative sampling for cascade ranking (docs/protocol.md §4.2, §4.5), pure vectorised
numpy.

Notation: B = requests in a group (one ``map_batches`` batch), N0 = candidate slots per request
before sampling (schema.N_OWN = 40), n = ``sample_num``, V = set of valid slots of the group
(``cand_mask`` True), V_i = the valid slots of request i.

For every request i, the n sampled negatives are a uniform random n-subset of V \\ V_i, drawn
without replacement (the protocol of the paper's RecFlow experiments: "for each request, sample
n extra candidates from the other requests' candidates in the same batch"). They are appended
after the N0 own slots of every ``cand_*`` column, so N = N0 + n, with ``cand_mask`` True and
``cand_priority`` = schema.SAMPLED_PRIORITY (0, below every real group, docs/protocol.md §4.3).

Small pool: if |V \\ V_i| < n, request i gets all of V \\ V_i (in random order) and the remaining
slots are padding: mask False, priority 0, every feature 0 (stored id 0 = padding). Columns
therefore always have N0 + n slots, so a group stacks into fixed-shape arrays.

Two exact samplers, chosen by pool size (both give each n-subset of V \\ V_i probability
1 / C(|V \\ V_i|, n), and both are deterministic for a given ``rng`` state):
- sparse (pool >= 4n, the usual case: 1024 requests x ~30 valid slots vs n <= 160): draw n
  indices with replacement into V \\ V_i, redraw the later copies (by position) of repeated
  indices until all differ. The redraw decision depends only on which draws are equal and on
  their positions, so the procedure commutes with any relabelling of the pool and the resulting
  set is uniform. Cost O(B n log n); no (B, |V|) matrix.
- dense (small pools): random keys (B, |V|), own slots keyed +inf, take the n smallest keys
  (argsort): a uniform random ordering of V \\ V_i with own slots last.

Only valid slots of other requests are eligible (docs/protocol.md §4.2): padded slots and the
request's own candidates are never drawn.
"""

from __future__ import annotations

import numpy as np

from raytopk.data import schema

__all__ = ["sample_negatives"]

_DENSE_POOL_FACTOR = 4  # use the rejection sampler when every pool holds >= 4 n slots


def _cand_columns(batch: dict[str, np.ndarray]) -> list[str]:
    """Every candidate column of the batch: schema.CAND_COLUMNS plus any other ``cand_*``."""
    missing = [c for c in schema.CAND_COLUMNS if c not in batch]
    if missing:
        raise ValueError(
            f"sample_negatives: batch is missing candidate columns {missing}; got {sorted(batch)}"
        )
    return [c for c in batch if c.startswith("cand_")]


def _sample_sparse(
    avail: np.ndarray, start: np.ndarray, own: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """(B, n) pool indices: n distinct picks per row from the pool minus the row's own range.

    Pool positions of row i's own valid slots are the contiguous range [start_i, start_i + own_i)
    (the pool is V in row-major order), so j in [0, avail_i) maps to j + own_i * (j >= start_i).
    """
    b = avail.shape[0]
    j = rng.integers(0, avail[:, None], size=(b, n))  # (B, n) with replacement
    rows = np.arange(b)  # rows that may still hold repeats
    # The keys below in int32 when they fit (< avail·n): the same keys, so the same redraws,
    # but a sort and a division several times faster than in int64 (B = 1024, n = 160).
    kt = np.int32 if (int(avail.max(initial=0)) + 1) * n < 2**31 else np.int64
    slot, nk = np.arange(n, dtype=kt), kt(n)
    while rows.size:
        # value * n + position: unique keys, so any sort orders equal values by position (a
        # stable sort by value) and the copies after the first occurrence are the ones redrawn
        key = np.sort(j[rows].astype(kt) * nk + slot, axis=1)  # (R, n)
        val = key // nk
        pos = key - val * nk
        r, c = np.nonzero(val[:, 1:] == val[:, :-1])
        if r.size == 0:
            break
        rr, cc = rows[r], pos[r, c + 1]
        j[rr, cc] = rng.integers(0, avail[rr])
        rows = np.unique(rr)  # rows without repeats are final
    return j + own[:, None] * (j >= start[:, None])


def _sample_dense(
    pool_row: np.ndarray, b: int, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(B, n) pool indices and (B, n) validity: random keys, own slots last, n smallest."""
    p = pool_row.shape[0]
    keys = rng.random((b, p))  # (B, P)
    own = pool_row[None, :] == np.arange(b)[:, None]  # (B, P)
    keys[own] = np.inf
    take = min(n, p)
    order = np.argsort(keys, axis=1, kind="stable")[:, :take]  # (B, take)
    ok = np.isfinite(np.take_along_axis(keys, order, axis=1))  # False: own slot, i.e. padding
    if take < n:  # fewer valid slots in the whole group than n
        order = np.pad(order, ((0, 0), (0, n - take)))
        ok = np.pad(ok, ((0, 0), (0, n - take)))
    return order, ok


def sample_negatives(
    batch: dict[str, np.ndarray], sample_num: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Append ``sample_num`` in-batch negatives to every request of ``batch``.

    Args:
        batch: columns of one group of B requests; every ``cand_*`` column is (B, N0, ...) and
            schema.CAND_COLUMNS must be present. Other columns pass through untouched.
        sample_num: n >= 0, negatives per request.
        rng: the generator all randomness comes from (same state -> same output).

    Returns:
        A new dict: ``cand_*`` columns (B, N0 + n, ...) with the sampled slots after the own
        slots (mask True, priority 0; padding where the pool is too small, see module doc).
    """
    if isinstance(sample_num, bool) or not isinstance(sample_num, (int, np.integer)):
        raise TypeError(f"'sample_num' must be an int, got {type(sample_num).__name__}")
    if sample_num < 0:
        raise ValueError(f"'sample_num' must be >= 0, got {sample_num}")
    cols = _cand_columns(batch)
    mask = np.asarray(batch[schema.CAND_MASK]).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(
            f"sample_negatives: '{schema.CAND_MASK}' must be (B, N0), got shape {mask.shape}"
        )
    b, n0 = mask.shape
    for c in cols:
        shape = np.shape(batch[c])
        if shape[:2] != (b, n0):
            raise ValueError(
                f"sample_negatives: column '{c}' has shape {shape}, expected ({b}, {n0}, ...) "
                f"like '{schema.CAND_MASK}'"
            )
    out = dict(batch)
    n = int(sample_num)
    if n == 0 or b == 0:
        return out

    pool = np.flatnonzero(mask.ravel())  # (P,) flat slot index of every valid slot, row-major
    own = mask.sum(axis=1)  # (B,) |V_i|
    avail = pool.size - own  # (B,) |V \ V_i|
    if avail.min() >= _DENSE_POOL_FACTOR * n:
        start = np.cumsum(own) - own  # (B,) first pool position of row i's own slots
        pick = _sample_sparse(avail, start, own, n, rng)  # (B, n) pool positions
        ok = np.ones((b, n), dtype=bool)
    else:
        pick, ok = _sample_dense(pool // n0, b, n, rng)
    slot = pool[pick] if pool.size else np.zeros((b, n), dtype=np.int64)  # (B, n) flat slots

    for c in cols:
        arr = np.asarray(batch[c])
        if c == schema.CAND_MASK:
            new = ok
        elif c == schema.CAND_PRIORITY:
            new = np.full((b, n), schema.SAMPLED_PRIORITY, dtype=arr.dtype)
        else:
            flat = arr.reshape(b * n0, *arr.shape[2:])
            new = flat[slot] if flat.shape[0] else np.zeros((b, n, *arr.shape[2:]), arr.dtype)
            if not ok.all():
                new[~ok] = 0  # padding slots carry stored id 0
        out[c] = np.concatenate([arr.astype(new.dtype, copy=False), new], axis=1)
    return out
