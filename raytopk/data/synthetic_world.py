"""The hidden world of the synthetic RecFlow generator (raytopk.data.synthetic): latent vectors of
categories, authors, upload types, demographics, items and users; the production scorer's item
biases; and each user's behaviour history, warmed up before the first day. The model is stated in
raytopk/data/synthetic.py's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

import numpy as np

from raytopk.data import schema

__all__ = [
    "DAY_MS",
    "DIM",
    "MAX_PER_STAGE",
    "POOL",
    "World",
    "build_world",
    "day_start_ms",
    "warm_up_histories",
]

DIM = 8  # latent dimension d
N_AGE, N_GENDER, N_PROVINCE, N_TYPE = 8, 3, 34, 6
MAX_PER_STAGE = 14  # default density: stages draw 4..14 items, longer than the 10 slots kept
POOL = 4 * MAX_PER_STAGE  # the default density's candidate pool per request
DAY_MS = 86_400_000
_TZ = ZoneInfo(schema.TIME_ZONE)


def day_start_ms(day: str) -> int:
    """Epoch milliseconds of ``day``'s midnight in Asia/Shanghai."""
    d = date.fromisoformat(day)
    return int(datetime(d.year, d.month, d.day, tzinfo=_TZ).timestamp() * 1000)

@dataclass
class World:
    """The hidden latent-preference model (raw ids = array indices)."""

    user_vec: np.ndarray  # (U, d)
    user_age: np.ndarray  # (U,)
    user_gender: np.ndarray
    user_province: np.ndarray
    user_device: np.ndarray
    user_activity: np.ndarray  # (U,) probabilities of issuing a request
    item_vec: np.ndarray  # (I, d)
    item_bias: np.ndarray  # (I,)
    item_author: np.ndarray
    item_cat1: np.ndarray
    item_cat2: np.ndarray
    item_type: np.ndarray
    item_upload_s: np.ndarray  # (I,) upload time, seconds since the epoch
    item_duration_ms: np.ndarray
    item_pop: np.ndarray  # (I,) pool-sampling probabilities
    hour_basis: np.ndarray  # (2, d)
    alpha: float
    id_cnt: dict[str, int]

    def score(self, users: np.ndarray, items: np.ndarray, hours: np.ndarray) -> np.ndarray:
        """Production score t(u, i, h): users (R,), items (R, P), request hours (R,) -> (R, P)."""
        ang = 2 * np.pi * np.asarray(hours, dtype=np.float64) / 24.0
        ctx = np.cos(ang)[:, None] * self.hour_basis[0] + np.sin(ang)[:, None] * self.hour_basis[1]
        q = self.user_vec[users] + 0.5 * ctx  # (R, d)
        dot = np.einsum("rd,rpd->rp", q, self.item_vec[items])
        return self.alpha * dot / math.sqrt(DIM) + self.item_bias[items]


def build_world(*, users: int, items: int, seed: int) -> World:
    """Deterministic hidden world for (users, items, seed)."""
    if users < 2 or items < 4 * POOL:
        raise ValueError(
            f"need users >= 2 and items >= {4 * POOL}, got users={users}, items={items}"
        )
    rng = np.random.default_rng([seed, 1])
    n_cat1 = 12
    n_cat2 = max(16, min(200, items // 50))
    n_author = max(20, items // 8)
    cat1_vec = rng.normal(size=(n_cat1, DIM))
    cat2_parent = rng.integers(0, n_cat1, n_cat2)
    cat2_vec = cat1_vec[cat2_parent] + 0.6 * rng.normal(size=(n_cat2, DIM))
    author_cat2 = rng.integers(0, n_cat2, n_author)
    author_vec = cat2_vec[author_cat2] + 0.7 * rng.normal(size=(n_author, DIM))
    type_vec = rng.normal(size=(N_TYPE, DIM))
    type_bias = 0.5 * rng.normal(size=N_TYPE)
    cat2_bias = 0.5 * rng.normal(size=n_cat2)  # quality: low-cardinality, quick to learn

    # Authors are Zipf-popular; an item mostly inherits its author's category.
    author_w = 1.0 / (np.arange(n_author) + 3.0) ** 0.7
    item_author = rng.choice(n_author, size=items, p=author_w / author_w.sum())
    own_cat = rng.random(items) < 0.8
    item_cat2 = np.where(own_cat, author_cat2[item_author], rng.integers(0, n_cat2, items))
    item_cat1 = cat2_parent[item_cat2]
    item_type = rng.choice(N_TYPE, size=items, p=np.array([0.4, 0.2, 0.15, 0.1, 0.1, 0.05]))
    item_vec = (
        0.6 * cat2_vec[item_cat2]
        + 0.5 * author_vec[item_author]
        + 0.3 * type_vec[item_type]
        + 0.3 * rng.normal(size=(items, DIM))
    )
    first_ms = day_start_ms(schema.FIRST_DAY)
    # Uploads spread over the 90 days before the first logged day, evening-heavy.
    upload_day = rng.integers(1, 91, items)
    upload_sec = (rng.normal(19.0, 4.0, items) % 24.0) * 3600.0
    item_upload_s = (first_ms // 1000 - upload_day * 86_400 + upload_sec).astype(np.int64)
    upload_hour = ((item_upload_s + 8 * 3600) % 86_400) / 3600.0  # Asia/Shanghai is UTC+8
    item_bias = (
        type_bias[item_type]
        + cat2_bias[item_cat2]
        + 0.5 * np.cos(2 * np.pi * (upload_hour - 20.0) / 24.0)
        + 0.2 * rng.normal(size=items)
    )
    item_duration_ms = rng.integers(5_000, 300_000, items).astype(np.int64)
    pop = np.exp(0.5 * item_bias + 0.5 * rng.normal(size=items))

    age_vec = 0.5 * rng.normal(size=(N_AGE, DIM))
    gender_vec = 0.4 * rng.normal(size=(N_GENDER, DIM))
    province_vec = 0.3 * rng.normal(size=(N_PROVINCE, DIM))
    user_age = rng.integers(0, N_AGE, users)
    user_gender = rng.integers(0, N_GENDER, users)
    user_province = rng.integers(0, N_PROVINCE, users)
    likes = rng.integers(0, n_cat1, (users, 2))
    user_vec = (
        cat1_vec[likes[:, 0]]
        + 0.6 * cat1_vec[likes[:, 1]]
        + age_vec[user_age]
        + gender_vec[user_gender]
        + province_vec[user_province]
        + 0.5 * rng.normal(size=(users, DIM))
    )
    n_device = users + users // 10
    user_device = rng.permutation(n_device)[:users]
    act = 1.0 / (rng.permutation(users) + 5.0) ** 0.8
    hour_basis = 0.8 * rng.normal(size=(2, DIM))

    world = World(
        user_vec=user_vec,
        user_age=user_age,
        user_gender=user_gender,
        user_province=user_province,
        user_device=user_device,
        user_activity=act / act.sum(),
        item_vec=item_vec,
        item_bias=item_bias,
        item_author=item_author,
        item_cat1=item_cat1,
        item_cat2=item_cat2,
        item_type=item_type,
        item_upload_s=item_upload_s,
        item_duration_ms=item_duration_ms,
        item_pop=pop / pop.sum(),
        hour_basis=hour_basis,
        alpha=1.0,
        id_cnt={},
    )
    # Scale the interaction so a request's pool has score spread ~1.3 (strong, noisy signal).
    u = rng.integers(0, users, 512)
    it = rng.integers(0, items, (512, 32))
    dot = world.score(u, it, rng.integers(0, 24, 512)) - item_bias[it]
    world.alpha = 1.3 / float(dot.std() + 1e-9)
    cnt = {
        "user_id": users,
        "device_id": n_device,
        "age": N_AGE,
        "gender": N_GENDER,
        "province": N_PROVINCE,
        "video_id": items,
        "author_id": n_author,
        "category_level_one": n_cat1,
        "category_level_two": n_cat2,
        "upload_type": N_TYPE,
    }
    world.id_cnt = {schema.RAW_ID_CNT_KEYS[f]: n for f, n in cnt.items()}
    return world


# ---- behaviour histories ---------------------------------------------------------------------
class _History:
    """Each user's last SEQ_LEN effective views, left-padded (most recent last)."""

    def __init__(self, users: int, silent: np.ndarray | None = None) -> None:
        L = schema.SEQ_LEN
        # Users whose views are never logged keep an empty sequence (a quirk of the release).
        self.silent = np.zeros(users, dtype=bool) if silent is None else silent
        self.item = np.full((users, L), -1, dtype=np.int64)
        self.time_ms = np.zeros((users, L), dtype=np.int64)
        self.play = np.zeros((users, L), dtype=np.int64)
        self.req = np.zeros((users, L), dtype=np.int64)

    def append(self, user, item, time_ms, play, req) -> None:
        """Add events (flat arrays) and keep each user's last SEQ_LEN by time."""
        L = schema.SEQ_LEN
        logged = ~self.silent[user]
        user, item, time_ms, play, req = (x[logged] for x in (user, item, time_ms, play, req))
        old = self.item >= 0
        ou = np.nonzero(old)[0]
        u = np.concatenate([ou, user])
        cols = [
            np.concatenate([getattr(self, n)[old], new])
            for n, new in (("item", item), ("time_ms", time_ms), ("play", play), ("req", req))
        ]
        order = np.lexsort((cols[1], u))
        u = u[order]
        cols = [c[order] for c in cols]
        # Position from the end of each user's run: keep the newest L.
        last = np.r_[u[1:] != u[:-1], True]
        end = np.flatnonzero(last)
        run_end = end[np.searchsorted(end, np.arange(u.size))]
        from_end = run_end - np.arange(u.size)
        keep = from_end < L
        slot = L - 1 - from_end[keep]
        for n, c in zip(("item", "time_ms", "play", "req"), cols):
            arr = getattr(self, n)
            arr[:] = -1 if n == "item" else 0
            arr[u[keep], slot] = c[keep]

    def seq_arrays(self, world: World, users: np.ndarray) -> np.ndarray:
        """(R, 50, 10) raw seq rows in RAW_SEQ_FIELDS order; padding rows all zero."""
        it = self.item[users]
        valid = it >= 0
        safe = np.where(valid, it, 0)
        fields = {
            "video_id": safe,
            "author_id": world.item_author[safe],
            "category_level_two": world.item_cat2[safe],
            "category_level_one": world.item_cat1[safe],
            "upload_type": world.item_type[safe],
            "upload_time": world.item_upload_s[safe],
            "duration_ms": world.item_duration_ms[safe],
            "time_ms": self.time_ms[users],
            "playing_time": self.play[users],
            "request_id": self.req[users],
        }
        out = np.stack([fields[f] for f in schema.RAW_SEQ_FIELDS], axis=-1).astype(np.int64)
        out[~valid] = 0
        return out


def warm_up_histories(world: World, rng: np.random.Generator) -> _History:
    """Histories before the first day: 0..50 preference-driven choices per user (3% silent)."""
    U = world.user_vec.shape[0]
    L = schema.SEQ_LEN
    silent = rng.random(U) < 0.03
    hist = _History(U, silent)
    n_hist = np.where(silent, 0, rng.integers(0, L + 1, U))
    first_ms = day_start_ms(schema.FIRST_DAY)
    for lo in range(0, U, 4096):
        users = np.arange(lo, min(U, lo + 4096))
        R = users.size
        cand = rng.choice(world.item_pop.size, size=(R * L, 16), p=world.item_pop)
        rep = np.repeat(users, L)
        hours = rng.integers(0, 24, R * L)
        s = world.score(rep, cand, hours) + rng.gumbel(size=cand.shape)
        pick = cand[np.arange(R * L), s.argmax(1)].reshape(R, L)
        times = np.sort(first_ms - rng.integers(60_000, 30 * DAY_MS, (R, L)), axis=1)
        keep = np.arange(L)[None, :] >= (L - n_hist[users])[:, None]
        hist.item[users] = np.where(keep, pick, -1)
        hist.time_ms[users] = np.where(keep, times, 0)
        hist.play[users] = np.where(keep, rng.integers(3_000, 60_000, (R, L)), 0)
        hist.req[users] = np.where(keep, rng.integers(1, 10**8, (R, L)), 0)
    return hist
