"""Synthetic RecFlow generator + converter: round trip, validation, atomic days, quirks, signal.

The expected rows are recomputed here with plain Python loops over the raw files (datetime +
zoneinfo for the time features), independently of the converter's vectorised code.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from raytopk.data import schema
from raytopk.data.convert import MISSING_RANK_PRIORITY, convert, read_meta
from raytopk.data.synthetic import build_world, day_names, generate, prepare_synthetic

# rank_pos_quirks: missing rank_pos rows/keys too, so the round trip covers the converter's handling
GEN = {"days": 2, "requests_per_day": 300, "users": 100, "items": 1000, "seed": 3,
       "rank_pos_quirks": True}  # fmt: skip
TZ = ZoneInfo(schema.TIME_ZONE)
DAYS = day_names(GEN["days"])
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "raw", **GEN)


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn_out") / "parquet"
    return out, convert(raw, out)


@pytest.fixture()
def raw_copy(raw, tmp_path) -> Path:
    dst = tmp_path / "raw"
    shutil.copytree(raw, dst)
    return dst


def _load(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _stamp(ts_seconds: float) -> tuple[int, int, int]:
    dt = datetime.fromtimestamp(ts_seconds, TZ)
    return dt.weekday() + 1, dt.hour + 1, dt.minute + 1


def _expected_day(raw: Path, day: str) -> tuple[list[dict], int]:
    """Rows the raw files imply, by plain loops; also the number of rank_pos lookups that miss."""
    rows = feather.read_table(raw / "all_stage" / f"{day}.feather").to_pylist()
    rid_dict = _load(raw / "request_id_dict" / f"{day}.pkl")
    seq_dict = _load(raw / "seq_effective_50_dict" / f"{day}.pkl")
    first, rank = {}, {}
    for r in rows:
        first.setdefault(r["request_id"], r)
        if r["rank_pos"] == 1 and r["rank_index"] >= 0:
            rank.setdefault((r["request_id"], r["video_id"]), r["rank_index"])
    sf = {f: i for i, f in enumerate(schema.RAW_STAGE_ITEM_FIELDS)}
    qf = {f: i for i, f in enumerate(schema.RAW_SEQ_FIELDS)}
    out, misses = [], 0
    for rid in sorted(set(rid_dict) & set(first)):
        a = first[rid]
        row = {"request_id": rid}
        row["weekday"], row["hour"], row["minute"] = _stamp(a["request_timestamp"] / 1000)
        for f in schema.USER_FIELDS:
            row[f] = a[f] + 1
        seq = seq_dict[rid]
        mask = [int(seq[t][qf["time_ms"]]) != 0 for t in range(schema.SEQ_LEN)]
        row[schema.SEQ_MASK] = mask
        for f in schema.SEQ_FIELDS:
            row[schema.seq_col(f)] = [
                int(seq[t][qf[f]]) + 1 if mask[t] else 0 for t in range(schema.SEQ_LEN)
            ]
        cand = {c: [] for c in schema.CAND_COLUMNS}
        for g in schema.CAND_GROUPS:
            arr = rid_dict[rid].get(g, [])
            for j in range(schema.GROUP_SIZE):
                if j < len(arr):
                    it = [int(x) for x in arr[j]]
                    for f in schema.SEQ_FIELDS:
                        cand[schema.cand_col(f)].append(it[sf[f]] + 1)
                    wd, hr, mi = _stamp(it[sf["upload_timestamp"]])
                    cand["cand_upload_weekday"].append(wd)
                    cand["cand_upload_hour"].append(hr)
                    cand["cand_upload_minute"].append(mi)
                    cand[schema.CAND_MASK].append(True)
                    if g == "rank_pos":
                        key = (rid, it[sf["video_id"]])
                        misses += key not in rank
                        p = 30 - rank[key] if key in rank else MISSING_RANK_PRIORITY
                    else:
                        p = schema.GROUP_PRIORITY[g]
                    cand[schema.CAND_PRIORITY].append(float(p))
                else:
                    for c in schema.CAND_COLUMNS:
                        cand[c].append(False if c == schema.CAND_MASK else 0)
        row.update(cand)
        out.append(row)
    return out, misses


# ---- round trip ------------------------------------------------------------------------------
def test_round_trip_matches_raw_files(raw, converted):
    out, counts = converted
    total_misses = 0
    for day in DAYS:
        expected, misses = _expected_day(raw, day)
        total_misses += misses
        table = pq.read_table(out / "requests" / f"day={day}")
        assert tuple(table.column_names) == schema.REQUEST_COLUMNS
        assert table.schema.field("cand_video_id").type == pa.list_(pa.int64(), schema.N_OWN)
        assert table.schema.field("cand_priority").type == pa.list_(pa.float32(), schema.N_OWN)
        assert table.schema.field("seq_mask").type == pa.list_(pa.bool_(), schema.SEQ_LEN)
        got = table.to_pylist()
        assert len(got) == len(expected) == GEN["requests_per_day"]
        for g, e in zip(got, expected):
            assert g == e, f"request {e['request_id']} on {day} differs"
        assert counts["per_day"][day]["rank_pos_missing_rank_index"] == misses
    assert counts["rank_pos_missing_rank_index"] == total_misses > 0
    meta = read_meta(out)
    assert meta["counts"]["rank_pos_missing_rank_index"] == total_misses


def test_meta_and_vocab(raw, converted):
    out, counts = converted
    meta = read_meta(out)
    id_cnt = _load(raw / "others" / "id_cnt.pkl")
    assert meta["schema_version"] == schema.SCHEMA_VERSION
    assert meta["days"] == DAYS
    assert set(meta["vocab"]) == set(schema.EMBEDDING_TABLE.values())
    assert meta["vocab"]["video_id"] == id_cnt["photo_id"] + 2
    assert meta["vocab"]["category_level_two"] == id_cnt[" category_level_two"] + 2
    assert meta["vocab"]["hour"] == 26 and meta["vocab"]["weekday"] == 9
    assert meta["counts"]["requests_per_day"] == {d: GEN["requests_per_day"] for d in DAYS}
    assert counts["days_converted"] == DAYS and counts["days_skipped"] == []
    # Every stored id fits its table (0 = padding only).
    t = pq.read_table(out / "requests").to_pydict()
    for f in schema.ITEM_FIELDS:
        v = np.asarray(t[schema.cand_col(f)])
        assert v.max() < meta["vocab"][schema.EMBEDDING_TABLE[f]]
        assert (v[~np.asarray(t[schema.CAND_MASK])] == 0).all()
        assert (v[np.asarray(t[schema.CAND_MASK])] >= 1).all()


def test_item_corpus_has_every_video_with_its_features(raw, converted):
    out, _ = converted
    items = pq.read_table(out / "items.parquet")
    assert tuple(items.column_names) == schema.ITEM_TABLE_COLUMNS
    rows = {r["video_id"]: r for r in items.to_pylist()}
    assert len(rows) == items.num_rows == read_meta(out)["num_items"]
    sf = {f: i for i, f in enumerate(schema.RAW_STAGE_ITEM_FIELDS)}
    qf = {f: i for i, f in enumerate(schema.RAW_SEQ_FIELDS)}
    seen = set()
    for day in DAYS:
        for stages in _load(raw / "request_id_dict" / f"{day}.pkl").values():
            for arr in stages.values():
                for it in arr:
                    vid = int(it[sf["video_id"]]) + 1
                    seen.add(vid)
                    r = rows[vid]
                    assert r["author_id"] == it[sf["author_id"]] + 1
                    assert r["category_level_one"] == it[sf["category_level_one"]] + 1
                    wd, hr, mi = _stamp(int(it[sf["upload_timestamp"]]))
                    assert (r["upload_weekday"], r["upload_hour"], r["upload_minute"]) == (
                        wd,
                        hr,
                        mi,
                    )
        for seq in _load(raw / "seq_effective_50_dict" / f"{day}.pkl").values():
            for step in seq:
                if step[qf["time_ms"]] != 0:
                    seen.add(int(step[qf["video_id"]]) + 1)
    assert seen == set(rows)


# ---- the generator ---------------------------------------------------------------------------
def test_quirks_of_the_release_are_present(raw):
    id_cnt = _load(raw / "others" / "id_cnt.pkl")
    assert "photo_id" in id_cnt and " category_level_two" in id_cnt
    assert sorted(p.stem for p in (raw / "all_stage").glob("*.feather")) == DAYS
    assert sorted(p.stem for p in (raw / "realshow").glob("*.feather")) == DAYS
    assert DAYS[0] == schema.FIRST_DAY
    rid_dict = _load(raw / "request_id_dict" / f"{DAYS[1]}.pkl")
    seq_dict = _load(raw / "seq_effective_50_dict" / f"{DAYS[1]}.pkl")
    missing = sum(len(set(schema.RAW_STAGES) - set(d)) for d in rid_dict.values())
    empty = sum(1 for d in rid_dict.values() for a in d.values() if len(a) == 0)
    longer = sum(1 for d in rid_dict.values() for a in d.values() if len(a) > schema.GROUP_SIZE)
    assert missing > 0 and empty > 0 and longer > 0
    for d in rid_dict.values():
        assert set(d) <= set(schema.RAW_STAGES)
        for a in d.values():
            assert a.ndim == 2 and a.shape[1] == len(schema.RAW_STAGE_ITEM_FIELDS)
    t_ms = np.stack(list(seq_dict.values()))[:, :, schema.RAW_SEQ_FIELDS.index("time_ms")]
    valid = t_ms != 0
    assert (~valid.any(1)).any(), "some sequences are empty"
    assert (valid.any(1) & ~valid.all(1)).any(), "some sequences are partly padded"
    # Left-padded: once a row is real, every later row is real; times ascend.
    assert (np.diff(valid.astype(int), axis=1) >= 0).all()
    assert (np.diff(np.where(valid, t_ms, 0), axis=1) >= 0).all()
    a = feather.read_table(raw / "all_stage" / f"{DAYS[1]}.feather")
    assert tuple(a.column_names) == schema.ALL_STAGE_COLUMNS
    # Every sequence event happened before its request.
    ts = dict(zip(a["request_id"].to_pylist(), a["request_timestamp"].to_pylist()))
    for rid, seq in seq_dict.items():
        assert (seq[:, schema.RAW_SEQ_FIELDS.index("time_ms")] < ts[rid]).all()


def test_default_funnel_is_recflows(tmp_path):
    """By default the rank stage passes exactly its top 10 (RecFlow's rank_pos): exactly 10 in
    >= 95% of requests, never more, every rank_pos item in all_stage (its rank_index found)."""
    kw = {k: v for k, v in GEN.items() if k != "rank_pos_quirks"}
    raw = generate(tmp_path / "raw", **{**kw, "requests_per_day": 600})
    counts = convert(raw, tmp_path / "out")
    assert counts["rank_pos_missing_rank_index"] == 0
    for day in DAYS:
        d = _load(raw / "request_id_dict" / f"{day}.pkl")
        assert all("rank_pos" in s for s in d.values())  # the key is never missing
        n = np.array([len(s["rank_pos"]) for s in d.values()])
        assert n.max() == 10 and n.min() >= 4 and (n == 10).mean() >= 0.95, np.bincount(n)
        a = feather.read_table(raw / "all_stage" / f"{day}.feather").to_pandas()
        per_req = a.groupby("request_id")["rank_pos"].sum()
        assert per_req.to_dict() == {rid: len(s["rank_pos"]) for rid, s in d.items()}
        t = pq.read_table(tmp_path / "out" / "requests" / f"day={day}")
        prio = np.array(t["cand_priority"].to_pylist())
        mask = np.array(t["cand_mask"].to_pylist())
        # priority 30 - rank_index for rank_pos (docs/protocol.md §4.3)
        rank_pos = (prio >= 20) & mask
        want = [len(d[rid]["rank_pos"]) for rid in t["request_id"].to_pylist()]
        np.testing.assert_array_equal(rank_pos.sum(1), want)


def test_generator_is_deterministic(tmp_path):
    kw = {**GEN, "days": 1, "requests_per_day": 50}
    a, b = generate(tmp_path / "a", **kw), generate(tmp_path / "b", **kw)
    for sub in ("all_stage", "realshow"):
        ta = feather.read_table(a / sub / f"{DAYS[0]}.feather")
        assert ta.equals(feather.read_table(b / sub / f"{DAYS[0]}.feather"))
    da, db = (_load(p / "request_id_dict" / f"{DAYS[0]}.pkl") for p in (a, b))
    assert da.keys() == db.keys()
    assert all(np.array_equal(da[k][s], db[k][s]) for k in da for s in da[k])


def test_funnel_follows_hidden_preference(raw, converted):
    """Later stages hold items the hidden production scorer prefers, and the behaviour sequence
    predicts the funnel: a one-feature model (share of the user's history in the candidate's
    level-two category) ranks rank_pos above prerank_neg far better than chance."""
    out, _ = converted
    world = build_world(users=GEN["users"], items=GEN["items"], seed=GEN["seed"])
    t = pq.read_table(out / "requests" / f"day={DAYS[1]}").to_pydict()
    users = np.asarray(t["user_id"]) - 1
    hours = np.asarray(t["hour"]) - 1
    vid = np.asarray(t["cand_video_id"]) - 1
    mask = np.asarray(t["cand_mask"])
    score = world.score(users, np.maximum(vid, 0), hours)
    G = schema.GROUP_SIZE
    means = [score[:, g * G : (g + 1) * G][mask[:, g * G : (g + 1) * G]].mean() for g in range(4)]
    assert means[0] > means[1] > means[2] > means[3], means  # rank_pos > rank_neg > coarse > pre
    # Within rank_pos, priority (30 - rank_index) correlates with the hidden score.
    pr = np.asarray(t["cand_priority"])[:, :G]
    ok = mask[:, :G] & (pr != MISSING_RANK_PRIORITY)
    assert np.corrcoef(pr[ok], score[:, :G][ok])[0, 1] > 0.2

    seq_c2 = np.asarray(t["seq_category_level_two"])
    seq_m = np.asarray(t["seq_mask"])
    c2 = np.asarray(t["cand_category_level_two"])
    share = ((c2[:, :, None] == seq_c2[:, None, :]) & seq_m[:, None, :]).sum(-1) / np.maximum(
        seq_m.sum(-1), 1
    )[:, None]
    pos = share[:, :G][mask[:, :G]]
    neg = share[:, 3 * G :][mask[:, 3 * G :]]
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc > 0.6, auc


# ---- validation ------------------------------------------------------------------------------
def test_truncated_feather(raw_copy, tmp_path):
    p = raw_copy / "all_stage" / f"{DAYS[1]}.feather"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"all_stage.*2024-01-14\.feather.*truncated"):
        convert(raw_copy, tmp_path / "out")


def test_truncated_pickle(raw_copy, tmp_path):
    p = raw_copy / "request_id_dict" / f"{DAYS[0]}.pkl"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"request_id_dict.*2024-01-13\.pkl.*truncated"):
        convert(raw_copy, tmp_path / "out")


def test_missing_column(raw_copy, tmp_path):
    p = raw_copy / "all_stage" / f"{DAYS[0]}.feather"
    feather.write_feather(feather.read_table(p).drop_columns(["rank_index"]), p)
    with pytest.raises(ValueError, match=r"all_stage.*2024-01-13\.feather.*missing.*rank_index"):
        convert(raw_copy, tmp_path / "out")


def test_day_missing_from_one_folder(raw_copy, tmp_path):
    (raw_copy / "seq_effective_50_dict" / f"{DAYS[1]}.pkl").unlink()
    with pytest.raises(ValueError, match=r"2024-01-14 \(missing seq_effective_50_dict/2024-01-14"):
        convert(raw_copy, tmp_path / "out", strict=True)
    # The complete day was converted all the same; asking only for it works too.
    assert read_meta(tmp_path / "out")["days"] == [DAYS[0]]
    assert convert(raw_copy, tmp_path / "o2", days=[DAYS[0]])["days_converted"] == [DAYS[0]]


def test_unknown_stage_key(raw_copy, tmp_path):
    p = raw_copy / "request_id_dict" / f"{DAYS[0]}.pkl"
    d = _load(p)
    rid = next(iter(d))
    d[rid]["bogus_stage"] = np.zeros((1, 8), dtype=np.int64)
    _dump(d, p)
    with pytest.raises(
        ValueError, match=rf"request_id_dict.*unknown stage key 'bogus_stage'.*{rid}"
    ):
        convert(raw_copy, tmp_path / "out")


def test_out_of_vocab_item_id(raw_copy, tmp_path):
    cnt = _load(raw_copy / "others" / "id_cnt.pkl")
    p = raw_copy / "request_id_dict" / f"{DAYS[1]}.pkl"
    d = _load(p)
    rid = next(r for r, st in d.items() if len(st.get("prerank_neg", [])))
    d[rid]["prerank_neg"] = d[rid]["prerank_neg"].copy()
    d[rid]["prerank_neg"][0, 0] = cnt["photo_id"] + 5
    _dump(d, p)
    with pytest.raises(ValueError, match=r"request_id_dict.*2024-01-14.*'video_id'.*beyond"):
        convert(raw_copy, tmp_path / "out")


def test_out_of_vocab_user_id(raw_copy, tmp_path):
    p = raw_copy / "all_stage" / f"{DAYS[0]}.feather"
    df = feather.read_table(p).to_pandas()
    df.loc[0, "user_id"] = -3
    feather.write_feather(df, p)
    with pytest.raises(ValueError, match=r"all_stage.*'user_id'.*-3.*beyond"):
        convert(raw_copy, tmp_path / "out")


def test_id_cnt_key_missing(raw_copy, tmp_path):
    p = raw_copy / "others" / "id_cnt.pkl"
    cnt = _load(p)
    del cnt["photo_id"]
    _dump(cnt, p)
    with pytest.raises(ValueError, match=r"id_cnt\.pkl.*'photo_id'"):
        convert(raw_copy, tmp_path / "out")


# ---- atomic days, re-runs ----------------------------------------------------------------------
def test_failed_day_leaves_nothing_and_rerun_skips_done_days(raw_copy, tmp_path):
    out = tmp_path / "out"
    p = raw_copy / "request_id_dict" / f"{DAYS[1]}.pkl"
    good = p.read_bytes()
    d = _load(p)
    # The bad id sits in a stage the 40 slots never read, so day 2 fails late (item corpus).
    rid = next(r for r, st in d.items() if len(st.get("realshow", [])))
    d[rid]["realshow"] = d[rid]["realshow"].copy()
    d[rid]["realshow"][0, 1] = 10**9
    _dump(d, p)
    with pytest.raises(ValueError, match="author_id"):
        convert(raw_copy, out)
    assert (out / "requests" / f"day={DAYS[0]}").is_dir()
    assert not (out / "requests" / f"day={DAYS[1]}").exists()
    assert not (out / "_per_day" / DAYS[1]).exists()
    assert not [q for q in out.rglob(".*")], "temporary files left behind"
    first = out / "requests" / f"day={DAYS[0]}" / "part-00000.parquet"
    mtime = first.stat().st_mtime_ns

    p.write_bytes(good)
    counts = convert(raw_copy, out)
    assert counts["days_skipped"] == [DAYS[0]] and counts["days_converted"] == [DAYS[1]]
    assert first.stat().st_mtime_ns == mtime
    assert read_meta(out)["days"] == DAYS
    assert counts["requests"] == GEN["days"] * GEN["requests_per_day"]
    again = convert(raw_copy, out, overwrite=True)
    assert again["days_converted"] == DAYS and again["days_skipped"] == []


def test_prepare_synthetic_is_idempotent_and_race_safe(tmp_path):
    kw = {"days": 1, "requests_per_day": 60, "users": 50, "items": 500, "seed": 1}
    with ThreadPoolExecutor(2) as ex:
        paths = list(ex.map(lambda _: prepare_synthetic(tmp_path, **kw), range(2)))
    assert paths[0] == paths[1] == tmp_path / "parquet"
    meta = read_meta(paths[0])
    assert meta["days"] == [schema.FIRST_DAY] and meta["counts"]["requests"] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parquet", "raw"]
    stamp = (tmp_path / "parquet" / "meta.json").stat().st_mtime_ns
    assert prepare_synthetic(tmp_path, **kw) == paths[0]
    assert (tmp_path / "parquet" / "meta.json").stat().st_mtime_ns == stamp


def test_prepare_synthetic_refuses_a_root_made_otherwise(tmp_path):
    kw = {"days": 1, "requests_per_day": 60, "users": 50, "items": 500, "seed": 1}
    prepare_synthetic(tmp_path, **kw)
    with pytest.raises(ValueError, match=r"requests_per_day: 60 there, 80 asked.*delete"):
        prepare_synthetic(tmp_path, **{**kw, "requests_per_day": 80})
    (tmp_path / "raw" / "synthetic.json").unlink()  # made by the generator before the stamp
    with pytest.raises(ValueError, match=r"generator: absent there, 2 asked"):
        prepare_synthetic(tmp_path, **kw)


def test_cli_round_trip(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "prepare_data_cli", ROOT / "jobs" / "prepare_data.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    main = cli.main
    raw = tmp_path / "raw"
    main(["synthetic", "--out", str(raw), "--days", "2", "--requests-per-day", "40",
          "--users", "30", "--items", "400", "--seed", "5"])  # fmt: skip
    assert "wrote synthetic RecFlow" in capsys.readouterr().out
    res = main(["convert", "--src", str(raw), "--out", str(tmp_path / "pq"), "--days", DAYS[1]])
    assert res["days_converted"] == [DAYS[1]]
    assert "requests/s" in capsys.readouterr().out
    res = main(["convert", "--src", str(raw), "--out", str(tmp_path / "pq")])
    assert res["days_skipped"] == [DAYS[1]] and res["days_converted"] == [DAYS[0]]
    assert json.loads((tmp_path / "pq" / "meta.json").read_text())["days"] == DAYS
    # the funnel's knobs: every rank stage sees >= 10 candidates; the reader-hostile quirks on
    main(["synthetic", "--out", str(tmp_path / "q"), "--days", "1", "--requests-per-day", "300",
          "--users", "30", "--items", "400",
          "--p-short-rank", "0", "--rank-pos-quirks"])  # fmt: skip
    d = _load(tmp_path / "q" / "request_id_dict" / f"{DAYS[0]}.pkl")
    n = [len(s["rank_pos"]) for s in d.values() if "rank_pos" in s]
    assert len(n) < len(d) and set(n) <= {0, 10} and 10 in n
    res = main(["convert", "--src", str(tmp_path / "q"), "--out", str(tmp_path / "pq_q")])
    assert read_meta(tmp_path / "pq_q")["counts"]["rank_pos_missing_rank_index"] > 0
