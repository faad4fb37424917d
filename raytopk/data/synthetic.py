"""Synthetic RecFlow: the raw layout of docs/protocol.md §4.1 drawn from a learnable latent
preference model.

RecFlow (Liu et al., "RecFlow: An Industrial Full Flow Recommendation Dataset", ICLR 2025) logs
every stage of a cascade: which items each request's pre-rank, coarse-rank, rank and re-rank
stages dropped or kept. The real release is a large download; this module writes the same files
(feather + pickle, same fields, same quirks) so the converter is exercised on every run and the
models have something real to learn.

The hidden world (notation: u = user, i = item, h = request hour, d = latent dimension):
- every category, author, upload type and demographic value has a latent vector; an item's vector
  is v_i = 0.6·c2(cat2_i) + 0.5·a(author_i) + 0.3·t(type_i) + noise (cat2 vectors are their cat1
  vector plus noise), a user's vector mixes two cat1 vectors with age/gender/province vectors;
- the production scorer is t(u, i, h) = α·(u + 0.5·c(h))·v_i / √d + b_i, with c(h) a smooth
  function of the hour of day and b_i an item bias from its upload type, upload hour and noise;
- each request draws a pool of items (popularity weighted) and runs the funnel with stage scores
  t + σ_s·ε (σ shrinking from pre-rank to rank): the lowest pool items by the pre-rank score are
  prerank_neg, the next stage drops coarse_neg, then rank_neg, and the survivors are rank_pos with
  rank_index = their rank under the rank score; the top of rank_pos by a re-rank score is shown
  (realshow) and gets behaviour labels (effective_view ~ Bernoulli(σ(1.5·t + 0.5)));
- behaviour sequences are each user's last 50 effective views (seeded before the first day by
  preference-driven choices), so they reflect the same preferences.

The rank stage passes exactly its top 10 to rank_pos, as RecFlow defines it ("the video ranks top-10
in the rank stage"); only a request whose rank stage saw fewer than 10 candidates (probability
``p_short_rank``, 1% by default) has fewer (4..9) and then no rank_neg.

Density: by default a request logs ~35 items (rank_pos 10, negative stages of 4..14);
``density="recflow"`` shapes the stages like the release (rank_pos 10, negative stages of tens to
hundreds, ~200 logged items per request, at most 490), for testing at the scale users bring.

Quirks of the real release reproduced here: id_cnt keys ``photo_id`` and ``' category_level_two'``;
negative-stage keys missing or empty for some requests; stages longer than 10 items; stage items
in no particular order; left-padded behaviour sequences (padding iff time_ms == 0), some empty.
Quirks a real reader would not survive are off by default (the reference loader looks every
rank_pos item's rank_index up in all_stage and reads request_id_dict[rid]["rank_pos"]
unconditionally, so the release it ran on has neither): ``rank_pos_quirks=True`` also drops 1% of
rank_pos items' all_stage rows and lets the rank_pos key be missing or empty, to exercise the
converter's handling of both.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from raytopk.data import schema
from raytopk.data.synthetic_world import (
    MAX_PER_STAGE,
    POOL,
    World,
    build_world,
    day_start_ms,
    warm_up_histories,
)
from raytopk.progress import Progress

__all__ = [
    "generate",
    "prepare_synthetic",
    "build_world",
    "World",
    "day_names",
    "DENSITIES",
    "stage_sizes",
]

STAGE_NOISE = (0.6, 0.45, 0.3, 0.2)  # pre-rank, coarse, rank, re-rank score noise
SHOWN = 6  # realshow items per request (top of rank_pos by the re-rank score)
P_KEY_MISSING = 0.02  # per (request, stage): key absent from request_id_dict
P_KEY_EMPTY = 0.02  # per (request, stage): empty (0, 8) array
P_RANK_ROW_DROPPED = 0.01  # rank_pos_quirks only: per rank_pos item, its all_stage row is missing
P_SHORT_RANK = 0.01  # per request: its rank stage saw < 10 candidates (rank_pos 4..9, no rank_neg)
RANK_POS = 10  # the rank stage's top 10 (RecFlow's rank_pos)
RETRIEVE_DRAWS = 3  # retrieval keeps the best third of its popularity-weighted draws
RETRIEVE_NOISE = 1.0
CHUNK = 50_000  # requests generated at once (bounds the per-chunk arrays)

# Stage density. "default": the small negative stages above (~35 logged items per request; what
# every quickstart and test figure was made with). "recflow": shaped like the real release, ~200
# stage items per request: rank_pos 10 (as in every density), and the
# negative stages gamma-distributed over tens to hundreds, capped so a request logs at most
# RECFLOW_MAX_ITEMS items (RecFlow's test feathers pad to 500 and 430 candidates per request).
DENSITIES = ("default", "recflow")
RECFLOW_RANK_POS = RANK_POS
RECFLOW_NEG = {  # stage -> (mean before clipping, max), gamma shape RECFLOW_NEG_SHAPE
    "rank_neg": (50.0, 120),
    "coarse_neg": (62.0, 160),
    "prerank_neg": (82.0, 200),
}
RECFLOW_NEG_SHAPE = 2.0
RECFLOW_NEG_MIN = 4
RECFLOW_MAX_ITEMS = RECFLOW_RANK_POS + sum(cap for _, cap in RECFLOW_NEG.values())  # 490
RECFLOW_RETRIEVE_DRAWS = 1.5  # fewer draws per slot than the default: pools are 10x wider
RECFLOW_CHUNK = 2_500  # requests per chunk: (chunk, ~500)-wide arrays stay ~100 MB each
RECFLOW_MIN_ITEMS = 10 * RECFLOW_MAX_ITEMS  # corpus size that fills ~500 distinct slots


def day_names(days: int, first: str = schema.FIRST_DAY) -> list[str]:
    """``days`` consecutive dates "YYYY-MM-DD" starting at ``first``."""
    start = date.fromisoformat(first)
    return [(start + timedelta(days=k)).isoformat() for k in range(days)]


# ---- one day ---------------------------------------------------------------------------------
def _retrieve(
    world: World, users, hours, rng, width: int = POOL, draws: float = RETRIEVE_DRAWS
) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval: (R, width) distinct items per request and how many are valid.

    Draws draws·width popularity-weighted items and keeps the width best by a very noisy
    production score, so a request's pool leans towards its user's taste (which is what lets a
    model tell its own candidates from other requests' items)."""
    R = users.size
    S = int(round(draws * width))
    draw = np.sort(rng.choice(world.item_pop.size, size=(R, S), p=world.item_pop), axis=1)
    dup = np.zeros((R, S), dtype=bool)
    dup[:, 1:] = draw[:, 1:] == draw[:, :-1]
    s = world.score(users, draw, hours) + RETRIEVE_NOISE * rng.normal(size=(R, S))
    order = np.argsort(np.where(dup, np.inf, -s), axis=1)[:, :width]
    # Best first: the first P slots of a row are the items its request logs (slot order is
    # internal; every file stores items in random order).
    return np.take_along_axis(draw, order, 1), (~dup).sum(1).clip(max=width)


def _desc_rank(score: np.ndarray) -> np.ndarray:
    """0-based rank of each entry within its row, descending (-inf entries last)."""
    order = np.argsort(-score, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(score.shape[1])[None, :], 1)
    return rank


def stage_sizes(
    density: str, rng: np.random.Generator, R: int, p_short_rank: float = 0.0
) -> tuple[np.ndarray, ...]:
    """Items per request in (rank_pos, rank_neg, coarse_neg, prerank_neg) under ``density``,
    before the corpus-size guard of _gen_chunk; each (R,) int64. (rerank/realshow are subsets of
    rank_pos.) rank_pos is RANK_POS except where the rank stage saw fewer candidates (probability
    ``p_short_rank``): then 4..9, all of which pass, so rank_neg is empty. Draws from ``rng`` in a
    fixed order, so generation stays deterministic."""
    if density == "default":
        neg = [rng.integers(4, MAX_PER_STAGE + 1, R) for _ in range(3)]
    elif density == "recflow":
        neg = []
        for mean, cap in RECFLOW_NEG.values():
            g = rng.gamma(RECFLOW_NEG_SHAPE, mean / RECFLOW_NEG_SHAPE, R)
            neg.append(np.clip(np.rint(g), RECFLOW_NEG_MIN, cap).astype(np.int64))
    else:
        raise ValueError(f"'density' should be one of {DENSITIES} but got {density!r}")
    short = rng.random(R) < p_short_rank
    n_pos = np.where(short, rng.integers(4, RANK_POS, R), RANK_POS).astype(np.int64)
    neg[0] = np.where(short, 0, neg[0]).astype(np.int64)
    return (n_pos, *neg)


def _gen_chunk(world, hist, rng, rid, ts, users, gen: dict):
    """One chunk of requests -> (all_stage columns, request_id_dict, seq dict, view events).
    ``gen``: density, p_short_rank, rank_pos_quirks (see generate)."""
    density = gen["density"]
    R = users.size
    hours = ((ts // 1000 + 8 * 3600) % 86_400) // 3600  # Asia/Shanghai hour
    if density == "default":  # rng order of the original generator: pool first, then sizes
        pool, n_unique = _retrieve(world, users, hours, rng)
        n_pos, n_rneg, n_cneg, n_pneg = stage_sizes(density, rng, R, gen["p_short_rank"])
    else:  # sizes first: the pool is as wide as the chunk's largest request
        n_pos, n_rneg, n_cneg, n_pneg = stage_sizes(density, rng, R, gen["p_short_rank"])
        width = int((n_pos + n_rneg + n_cneg + n_pneg).max())
        pool, n_unique = _retrieve(world, users, hours, rng, width, RECFLOW_RETRIEVE_DRAWS)
    n_pneg = np.minimum(n_pneg, n_unique - n_pos - n_rneg - n_cneg)  # tiny corpora only
    P = n_pos + n_rneg + n_cneg + n_pneg
    W = pool.shape[1]  # the default density: POOL
    col = np.arange(W)[None, :]
    valid = col < P[:, None]
    t = world.score(users, pool, hours)  # (R, W)

    def stage_rank(alive, sigma):
        s = np.where(alive, t + sigma * rng.normal(size=t.shape), -np.inf)
        return _desc_rank(s)

    r1 = stage_rank(valid, STAGE_NOISE[0])
    prerank_neg = valid & (r1 >= (P - n_pneg)[:, None])
    alive = valid & ~prerank_neg
    r2 = stage_rank(alive, STAGE_NOISE[1])
    coarse_neg = alive & (r2 >= (n_pos + n_rneg)[:, None])
    alive &= ~coarse_neg
    r3 = stage_rank(alive, STAGE_NOISE[2])
    rank_pos = alive & (r3 < n_pos[:, None])
    rank_neg = alive & ~rank_pos
    r4 = stage_rank(rank_pos, STAGE_NOISE[3])
    rerank_pos = rank_pos & (r4 < SHOWN)
    rerank_neg = rank_pos & ~rerank_pos
    realshow = rerank_pos
    rank_index = np.where(alive, r3, -1)
    rerank_index = np.where(rank_pos, r4, -1)

    # Behaviour labels of shown items.
    p_ev = 1.0 / (1.0 + np.exp(-(1.5 * t + 0.5)))
    ev = realshow & (rng.random(t.shape) < p_ev)
    dur = world.item_duration_ms[pool]
    play = np.where(realshow, (dur * np.clip(p_ev + 0.2 * rng.normal(size=t.shape), 0.02, 1.5)), 0)
    play = play.astype(np.int64)
    long_view = ev & (rng.random(t.shape) < 0.5 * p_ev)
    like = ev & (rng.random(t.shape) < 0.1 * p_ev)
    follow = ev & (rng.random(t.shape) < 0.02 * p_ev)
    forward = ev & (rng.random(t.shape) < 0.02 * p_ev)
    comment = ev & (rng.random(t.shape) < 0.03 * p_ev)

    flags = {
        "realshow": realshow,
        "rerank_pos": rerank_pos,
        "rerank_neg": rerank_neg,
        "rank_pos": rank_pos,
        "rank_neg": rank_neg,
        "coarse_neg": coarse_neg,
        "prerank_neg": prerank_neg,
    }

    # ---- all_stage rows: one per logged (request, item), rows in random order per request
    row_ok = valid
    if gen["rank_pos_quirks"]:
        row_ok = valid & ~(rank_pos & (rng.random(t.shape) < P_RANK_ROW_DROPPED))
    key = np.where(row_ok, rng.random(t.shape), 2.0)
    order = np.argsort(key, axis=1)
    rows_r, rows_c = np.nonzero(np.take_along_axis(row_ok, order, 1))
    rows_c = order[rows_r, rows_c]
    it = pool[rows_r, rows_c]
    a = {
        "request_id": rid[rows_r],
        "request_timestamp": ts[rows_r],
        "user_id": users[rows_r],
        "device_id": world.user_device[users][rows_r],
        "age": world.user_age[users][rows_r],
        "gender": world.user_gender[users][rows_r],
        "province": world.user_province[users][rows_r],
        "video_id": it,
        "author_id": world.item_author[it],
        "category_level_one": world.item_cat1[it],
        "category_level_two": world.item_cat2[it],
        "upload_type": world.item_type[it],
        "upload_timestamp": world.item_upload_s[it],
        "duration": world.item_duration_ms[it],
        **{k: v[rows_r, rows_c] for k, v in flags.items()},
        "rank_index": rank_index[rows_r, rows_c],
        "rerank_index": rerank_index[rows_r, rows_c],
        "playing_time": play[rows_r, rows_c],
        "effective_view": ev[rows_r, rows_c],
        "long_view": long_view[rows_r, rows_c],
        "like": like[rows_r, rows_c],
        "follow": follow[rows_r, rows_c],
        "forward": forward[rows_r, rows_c],
        "comment": comment[rows_r, rows_c],
    }
    a = {k: np.asarray(a[k]).astype(np.int64) for k in schema.ALL_STAGE_COLUMNS}

    # ---- request_id_dict: request -> stage -> (n, 8), items in random order, some quirks
    item_fields = {
        "video_id": pool,
        "author_id": world.item_author[pool],
        "duration_ms": dur,
        "category_level_two": world.item_cat2[pool],
        "upload_type": world.item_type[pool],
        "upload_timestamp": world.item_upload_s[pool],
        "category_level_one": world.item_cat1[pool],
        "effective_view": ev.astype(np.int64),
    }
    feats = np.stack([item_fields[f] for f in schema.RAW_STAGE_ITEM_FIELDS], -1).astype(np.int64)
    per_stage: dict[str, list[np.ndarray]] = {}
    empty = np.zeros((0, len(schema.RAW_STAGE_ITEM_FIELDS)), dtype=np.int64)
    for stage in schema.RAW_STAGES:
        m = flags[stage]
        key = np.where(m, rng.random(t.shape), 2.0)
        order = np.argsort(key, axis=1)
        cnt = m.sum(1)
        rr, cc = np.nonzero(np.arange(W)[None, :] < cnt[:, None])
        flat = feats[rr, order[rr, cc]]
        per_stage[stage] = np.split(flat, np.cumsum(cnt)[:-1])
    quirk = rng.random((R, len(schema.RAW_STAGES)))
    if not gen["rank_pos_quirks"]:
        quirk[:, schema.RAW_STAGES.index("rank_pos")] = 1.0
    rid_dict = {}
    for r in range(R):
        d = {}
        for s, stage in enumerate(schema.RAW_STAGES):
            q = quirk[r, s]
            if q < P_KEY_MISSING:
                continue
            d[stage] = empty if q < P_KEY_MISSING + P_KEY_EMPTY else per_stage[stage][r]
        rid_dict[int(rid[r])] = d

    seq = hist.seq_arrays(world, users)
    seq_dict = dict(zip(rid.tolist(), seq))

    er, ec = np.nonzero(ev)
    events = (
        users[er],
        pool[er, ec],
        ts[er] + rng.integers(1_000, 600_000, er.size),
        play[er, ec],
        rid[er],
    )
    return a, rid_dict, seq_dict, events


class _FeatherWriter:
    """Feather v2 (Arrow IPC file, lz4 like ``feather.write_feather``) written chunk by chunk, so
    a real-density day (~50M all_stage rows) never sits in memory as one table."""

    def __init__(self, path: Path) -> None:
        self.path, self._w = path, None

    def write(self, table: pa.Table) -> None:
        if self._w is None:
            codec = "lz4" if pa.Codec.is_available("lz4_frame") else None
            opts = pa.ipc.IpcWriteOptions(compression=codec)
            self._w = pa.ipc.new_file(str(self.path), table.schema, options=opts)
        self._w.write_table(table, max_chunksize=65_536)  # write_feather's default chunk

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def _write_day(
    raw: Path, day: str, world, hist, rng, requests: int, next_rid: int, gen: dict
) -> int:
    """Generate and write one day; returns the next free request id."""
    day_ms = day_start_ms(day)
    # Request times: evening-heavy mixture over the Asia/Shanghai day.
    sec = np.where(
        rng.random(requests) < 0.7,
        rng.normal(20.0, 2.5, requests) % 24.0,
        rng.uniform(0.0, 24.0, requests),
    )
    ts = np.sort(day_ms + (sec * 3_600_000).astype(np.int64))
    rids = next_rid + np.cumsum(rng.integers(1, 5, requests))
    users = rng.choice(world.user_vec.shape[0], size=requests, p=world.user_activity)

    all_w = _FeatherWriter(raw / "all_stage" / f"{day}.feather")
    show_w = _FeatherWriter(raw / "realshow" / f"{day}.feather")
    rid_dict: dict = {}
    seq_dict: dict = {}
    events = []
    chunk = CHUNK if gen["density"] == "default" else RECFLOW_CHUNK
    try:
        for lo in range(0, requests, chunk):
            sl = slice(lo, min(requests, lo + chunk))
            a, rd, sd, ev = _gen_chunk(world, hist, rng, rids[sl], ts[sl], users[sl], gen)
            tbl = pa.table(a)
            all_w.write(tbl)
            show_w.write(tbl.filter(pa.array(a["realshow"] == 1)))
            del tbl, a
            rid_dict.update(rd)
            seq_dict.update(sd)
            events.append(ev)
    finally:
        all_w.close()
        show_w.close()
    with open(raw / "request_id_dict" / f"{day}.pkl", "wb") as f:
        pickle.dump(rid_dict, f, protocol=4)
    del rid_dict
    with open(raw / "seq_effective_50_dict" / f"{day}.pkl", "wb") as f:
        pickle.dump(seq_dict, f, protocol=4)
    del seq_dict
    # Today's effective views become tomorrow's behaviour sequences.
    hist.append(*(np.concatenate(parts) for parts in zip(*events)))
    return int(rids[-1]) + 1


def generate(
    raw_dir: str | os.PathLike,
    *,
    days: int = 4,
    requests_per_day: int = 1500,
    users: int = 400,
    items: int = 4000,
    seed: int = 0,
    density: str = "default",
    p_short_rank: float = P_SHORT_RANK,
    rank_pos_quirks: bool = False,
) -> Path:
    """Write a synthetic RecFlow release to ``raw_dir`` (docs/protocol.md §4.1 layout); returns it.

    Days are consecutive from schema.FIRST_DAY. Generation is day by day (requests in chunks of
    CHUNK, or RECFLOW_CHUNK at density "recflow"; all_stage is written chunk by chunk), so memory
    is bounded by one day's pickles. ``density``: one of DENSITIES (see stage_sizes).
    ``p_short_rank``: per request, the probability that its rank stage saw fewer than 10
    candidates (then rank_pos has 4..9 items). ``rank_pos_quirks``: also drop 1% of rank_pos
    items' all_stage rows and let the rank_pos key be missing/empty (converter tests only).
    """
    for name, v, lo in (("days", days, 1), ("requests_per_day", requests_per_day, 1)):
        if int(v) < lo:
            raise ValueError(f"'{name}' should be >= {lo} but got {v}")
    if not 0.0 <= p_short_rank <= 1.0:
        raise ValueError(f"'p_short_rank' should be in [0, 1] but got {p_short_rank}")
    if density not in DENSITIES:
        raise ValueError(f"'density' should be one of {DENSITIES} but got {density!r}")
    if density == "recflow" and items < RECFLOW_MIN_ITEMS:
        raise ValueError(
            f"'items' should be >= {RECFLOW_MIN_ITEMS} at density 'recflow' (a request logs up "
            f"to {RECFLOW_MAX_ITEMS} distinct items) but got {items}"
        )
    raw = Path(raw_dir)
    for sub in ("all_stage", "realshow", "seq_effective_50_dict", "request_id_dict", "others"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    world = build_world(users=users, items=items, seed=seed)
    rng = np.random.default_rng([seed, 2])
    hist = warm_up_histories(world, rng)
    next_rid = 7_000_000_000
    gen = {"density": density, "p_short_rank": p_short_rank, "rank_pos_quirks": rank_pos_quirks}
    progress = Progress(f"generating {raw}", days, "days")
    for day in day_names(days):
        next_rid = _write_day(raw, day, world, hist, rng, requests_per_day, next_rid, gen)
        progress.advance()
    progress.done()
    with open(raw / "others" / "id_cnt.pkl", "wb") as f:
        pickle.dump(dict(world.id_cnt), f, protocol=4)
    return raw


def _publish(tmp: Path, final: Path) -> None:
    """Rename tmp -> final; if another process won the race, keep theirs and drop ours."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


GENERATOR_VERSION = 2  # 2: rank_pos is the rank stage's top 10; no reader-hostile quirks by default
STAMP = "synthetic.json"  # root/raw/STAMP: the generator version and arguments that made root/raw


def prepare_synthetic(
    root: str | os.PathLike,
    *,
    days: int = 4,
    requests_per_day: int = 1500,
    seed: int = 0,
    **gen_kwargs,
) -> Path:
    """Idempotent: generate root/raw and convert it to root/parquet where absent; return the latter.

    Both steps write into a private temporary directory and rename it into place, so concurrent
    callers never see (or produce) a half-written dataset. An existing root/raw is reused only if
    its stamp (root/raw/synthetic.json) names this generator version and these arguments;
    otherwise a ValueError says what differs (delete the root to regenerate it).
    """
    from raytopk.data.convert import convert  # local: convert imports nothing from here

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    raw, out = root / "raw", root / "parquet"
    stamp = {"generator": GENERATOR_VERSION, "days": days, "requests_per_day": requests_per_day,
             "seed": seed, **gen_kwargs}  # fmt: skip
    if raw.is_dir():
        _check_stamp(raw, stamp)
    else:
        tmp = root / f".raw-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            generate(tmp, days=days, requests_per_day=requests_per_day, seed=seed, **gen_kwargs)
            (tmp / STAMP).write_text(json.dumps(stamp, sort_keys=True) + "\n")
            _publish(tmp, raw)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _check_stamp(raw, stamp)  # a concurrent caller with other arguments may have won
    if not (out / "meta.json").is_file():
        tmp = root / f".parquet-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            convert(raw, tmp)
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_stamp(raw: Path, want: dict) -> None:
    path = raw / STAMP
    try:
        have = json.loads(path.read_text())
    except FileNotFoundError:
        have = {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable synthetic-data stamp ({e})") from None
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        what = ", ".join(
            f"{k}: {have.get(k, 'absent')} there, {want.get(k, 'absent')} asked" for k in diff
        )
        raise ValueError(
            f"synthetic data at {raw} was made with other settings ({what}); delete "
            f"{raw.parent} to regenerate it, or point the synthetic root elsewhere"
        )
