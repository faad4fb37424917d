"""The bounded-memory converter against the previous one, real-density generation, incomplete days.

``convert_v1_oracle.py`` (beside this file) is raytopk/data/convert.py as it was before the
bounded-memory rewrite (commit cd18c90); it is the oracle: on the same raw files the new converter
must write the same tables (rows, values, schema), the same item corpus and the same counts.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from raytopk.data import convert as conv
from raytopk.data import request_rows
from raytopk.data.synthetic import (
    RECFLOW_MAX_ITEMS,
    RECFLOW_RANK_POS,
    day_names,
    generate,
    stage_sizes,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# rank_pos_quirks: the reader-hostile quirks too (missing rank_pos rows/keys), so both converters
# handle them
GEN = {"days": 2, "requests_per_day": 300, "users": 100, "items": 1000, "seed": 3,
       "rank_pos_quirks": True}  # fmt: skip
DAYS = day_names(2)


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


oracle = _import("convert_v1_oracle", HERE / "convert_v1_oracle.py")


def _load(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("scale") / "raw", **GEN)


def _awkward(raw: Path, dst: Path) -> Path:
    """A copy of ``raw`` whose day 2 has the input shapes the vectorised code could get wrong."""
    shutil.copytree(raw, dst)
    day = DAYS[1]
    a_path = dst / "all_stage" / f"{day}.feather"
    df = feather.read_table(a_path).to_pandas()
    rng = np.random.default_rng(0)
    df = df.iloc[rng.permutation(len(df))].reset_index(drop=True)  # requests not contiguous
    rp = df.index[df["rank_pos"] == 1]
    dup = df.loc[rp[:40]].copy()
    dup["rank_index"] = 99  # a later duplicate (request, video) row must not win
    df = df.astype({"rank_index": "float64"})
    df.loc[rp[40:60], "rank_index"] = np.nan  # missing rank_index -> priority 8
    df.loc[rp[60:70], "rank_index"] = -1
    df = pd.concat([df, dup], ignore_index=True)
    extra = df.iloc[:3].copy()
    extra["request_id"] = [1, 2, 3]  # only in all_stage
    df = pd.concat([df, extra], ignore_index=True)
    feather.write_feather(df, a_path, chunksize=1000)  # many record batches

    r_path = dst / "request_id_dict" / f"{day}.pkl"
    d = _load(r_path)
    ids = sorted(d)
    d[5] = {"rank_pos": np.zeros((2, 8), np.int64)}  # only in request_id_dict
    d[ids[0]]["rank_neg"] = d[ids[0]]["rank_neg"].astype(np.int32)  # another dtype
    d[ids[1]]["coarse_neg"] = np.asfortranarray(d[ids[1]]["coarse_neg"])  # Fortran order
    d[ids[2]]["prerank_neg"] = np.zeros(0, np.int64)  # empty and 1-d
    d[ids[3]]["realshow"] = d[ids[3]]["realshow"].tolist()  # a list, not an array
    d[ids[4]] = dict(reversed(list(d[ids[4]].items())))  # another stage order
    d[ids[5]]["rank_pos"] = d[ids[5]]["rank_pos"][::-1]  # a non-contiguous view
    _dump(d, r_path)
    q_path = dst / "seq_effective_50_dict" / f"{day}.pkl"
    q = _load(q_path)
    for r in ids[10:15]:
        del q[r]  # missing sequence -> empty
    q[ids[20]] = q[ids[20]].astype(np.int32)
    _dump(q, q_path)
    return dst


def _assert_same_output(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for k in ("schema_version", "vocab", "days", "counts", "num_items"):
        assert ma[k] == mb[k], k
    for day in ma["days"]:
        ta = pq.read_table(a / "requests" / f"day={day}")
        tb = pq.read_table(b / "requests" / f"day={day}")
        assert ta.schema.equals(tb.schema, check_metadata=True)
        assert ta.num_rows == tb.num_rows and ta.equals(tb), day
        parts = [sorted(p.name for p in (x / "requests" / f"day={day}").iterdir()) for x in (a, b)]
        assert parts[0] == parts[1]
        for f in parts[0]:  # same rows in the same part files
            fa = pq.read_table(a / "requests" / f"day={day}" / f)
            assert fa.equals(pq.read_table(b / "requests" / f"day={day}" / f))
        ia = pq.read_table(a / "_per_day" / day / "items.parquet")
        assert ia.equals(pq.read_table(b / "_per_day" / day / "items.parquet"))
    assert pq.read_table(a / "items.parquet").equals(pq.read_table(b / "items.parquet"))


@pytest.mark.parametrize("case", ["synthetic", "awkward", "small_chunks"])
def test_same_output_as_previous_converter(raw, tmp_path, monkeypatch, case):
    src = raw if case != "awkward" else _awkward(raw, tmp_path / "awkward")
    if case == "small_chunks":  # several chunks per part file, several part files per day
        monkeypatch.setattr(conv, "CHUNK_REQUESTS", 32)
        monkeypatch.setattr(conv, "ROW_GROUP_REQUESTS", 64)
        monkeypatch.setattr(conv, "ROWS_PER_PART", 128)
        monkeypatch.setattr(oracle, "ROWS_PER_PART", 128)
    oracle.convert(src, tmp_path / "old")
    counts = conv.convert(src, tmp_path / "new")
    assert counts["days_converted"] == DAYS
    _assert_same_output(tmp_path / "old", tmp_path / "new")
    if case == "small_chunks":
        parts = sorted((tmp_path / "new" / "requests" / f"day={DAYS[0]}").iterdir())
        assert len(parts) == 3  # 128 + 128 + 44 requests
        assert [pq.ParquetFile(f).metadata.num_row_groups for f in parts] == [2, 2, 1]
    if case == "awkward":
        c = counts["per_day"][DAYS[1]]
        assert c["requests_only_in_all_stage"] == 3 and c["requests_missing_seq"] == 5


def test_same_output_on_a_real_density_day(tmp_path):
    src = generate(tmp_path / "raw", days=1, requests_per_day=120, users=60,
                   items=6000, seed=1, density="recflow")  # fmt: skip
    oracle.convert(src, tmp_path / "old")
    conv.convert(src, tmp_path / "new")
    _assert_same_output(tmp_path / "old", tmp_path / "new")


def test_day_without_requests(raw, tmp_path):
    """(The previous converter failed here: np.stack of no sequences.) A day whose requests are
    all dropped writes one empty part file with the usual schema."""
    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    _dump({}, src / "request_id_dict" / f"{DAYS[0]}.pkl")
    counts = conv.convert(src, tmp_path / "new")
    assert counts["requests_per_day"] == {DAYS[0]: 0, DAYS[1]: GEN["requests_per_day"]}
    empty = pq.read_table(tmp_path / "new" / "requests" / f"day={DAYS[0]}")
    full = pq.read_table(tmp_path / "new" / "requests" / f"day={DAYS[1]}")
    assert empty.num_rows == 0 and empty.schema.equals(full.schema)


def test_time_features_match_zoneinfo():
    """The fixed-offset fast path (1992..2100) and the tz-database path agree with the old code."""
    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, 4_102_444_800, 2000),  # 1970 .. 2100: Shanghai's DST years -> tz path
        rng.integers(694_224_000, 4_102_444_800, 2000),  # fast path
        np.array([694_224_000, 1_700_000_000, 4_102_444_799]),
        np.zeros(0, np.int64),
    ]
    for ts in cases:
        for unit, x in (("s", ts), ("ms", ts * 1000 + rng.integers(0, 1000, ts.size))):
            want, got = oracle.time_features(x, unit), conv.time_features(x, unit)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
                assert got[k].dtype == want[k].dtype


# ---- real-density generator ----------------------------------------------------------------------
def test_recflow_density_stage_sizes(tmp_path):
    n_pos, n_rneg, n_cneg, n_pneg = stage_sizes("recflow", np.random.default_rng(0), 20_000)
    total = n_pos + n_rneg + n_cneg + n_pneg
    assert (n_pos == RECFLOW_RANK_POS).all() and RECFLOW_RANK_POS == 10  # p_short_rank 0 here
    assert 190 <= total.mean() <= 210, total.mean()
    assert total.max() <= RECFLOW_MAX_ITEMS <= 500
    for n in (n_rneg, n_cneg, n_pneg):  # tens to hundreds
        assert n.min() < 20 and n.max() >= 100

    raw = generate(tmp_path / "raw", days=1, requests_per_day=200, users=50, items=5000,
                   seed=0, density="recflow")  # fmt: skip
    a = feather.read_table(raw / "all_stage" / f"{DAYS[0]}.feather").to_pandas()
    per_req = a.groupby("request_id")[["rank_pos", "rank_neg", "coarse_neg", "prerank_neg"]].sum()
    assert 170 <= len(a) / a["request_id"].nunique() <= 230
    d = _load(raw / "request_id_dict" / f"{DAYS[0]}.pkl")
    n_rank_pos = np.array([len(s["rank_pos"]) for s in d.values()])  # the key is always there
    assert n_rank_pos.max() == RECFLOW_RANK_POS and (n_rank_pos == 10).mean() >= 0.95
    # every rank_pos item has its all_stage row (no reader-hostile quirk by default)
    in_dict = pd.Series({rid: len(s["rank_pos"]) for rid, s in d.items()})
    assert per_req["rank_pos"].eq(in_dict.reindex(per_req.index)).all()


def test_stage_sizes_short_rank_stage():
    """rank_pos is 10 unless the rank stage saw fewer candidates: then 4..9 and no rank_neg."""
    for density in ("default", "recflow"):
        n_pos, n_rneg, n_cneg, n_pneg = stage_sizes(density, np.random.default_rng(5), 20_000, 0.02)
        short = n_pos < 10
        assert n_pos.max() == 10 and n_pos.min() >= 4
        assert 0.015 <= short.mean() <= 0.025
        assert (n_rneg[short] == 0).all() and (n_rneg[~short] >= 4).all()
        assert (n_cneg >= 4).all() and (n_pneg >= 4).all()
    rng_a = np.random.default_rng(5)
    with pytest.raises(ValueError, match="'density'"):
        stage_sizes("dense", rng_a, 3)
    with pytest.raises(ValueError, match="'items' should be >= 4900"):
        generate("unused", days=1, requests_per_day=3, items=1000, density="recflow")


# ---- incomplete days -----------------------------------------------------------------------------
def _prepare_cli():
    return _import("prepare_data_cli", ROOT / "jobs" / "prepare_data.py").main


@pytest.mark.parametrize("gone", ["all_stage/2024-01-13.feather", "request_id_dict/2024-01-14.pkl"])
def test_incomplete_day_named_and_the_others_converted(raw, tmp_path, capsys, gone):
    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    (src / gone).unlink()
    day = gone.split("/")[1].split(".")[0]
    other = [d for d in DAYS if d != day]
    main = _prepare_cli()
    res = main(["convert", "--src", str(src), "--out", str(tmp_path / "pq")])  # exit 0
    err = capsys.readouterr().err
    assert res["days_converted"] == other and res["days_incomplete"] == {day: [gone]}
    assert f"1 incomplete day(s) not converted: {day} (missing {gone})" in err
    assert ("Hugging Face" in err) == (day == "2024-01-13")
    meta = conv.read_meta(tmp_path / "pq")
    assert meta["days"] == other and meta["days_incomplete"] == {day: [gone]}
    assert conv.missing_days(meta, DAYS) == [day]
    assert conv.missing_days(tmp_path / "pq", DAYS[::-1]) == [day]
    assert conv.missing_days(tmp_path / "pq" / "meta.json", other) == []

    with pytest.raises(SystemExit) as e:  # --strict: same conversion, non-zero exit
        main(["convert", "--src", str(src), "--out", str(tmp_path / "pq2"), "--strict"])
    assert e.value.code == 1
    assert gone in capsys.readouterr().err
    assert conv.read_meta(tmp_path / "pq2")["days"] == other


def test_every_incomplete_day_in_one_message(raw, tmp_path):
    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    (src / "all_stage" / f"{DAYS[0]}.feather").unlink()
    (src / "seq_effective_50_dict" / f"{DAYS[1]}.pkl").unlink()
    (src / "request_id_dict" / f"{DAYS[1]}.pkl").unlink()
    with pytest.raises(ValueError) as e:
        conv.convert(src, tmp_path / "pq", strict=True, days=[*DAYS, "2024-01-15"])
    msg = str(e.value)
    assert "3 incomplete day(s)" in msg
    assert f"{DAYS[0]} (missing all_stage/{DAYS[0]}.feather)" in msg
    assert (
        f"{DAYS[1]} (missing request_id_dict/{DAYS[1]}.pkl, seq_effective_50_dict/{DAYS[1]}.pkl)"
        in msg
    )
    assert "2024-01-15 (missing all_stage/2024-01-15.feather, request_id_dict" in msg
    assert conv.read_meta(tmp_path / "pq")["days"] == []


# ---- bench_scale ---------------------------------------------------------------------------------
def test_bench_scale_quick_generate_and_convert(tmp_path):
    bench = _import("bench_scale", ROOT / "jobs" / "bench_scale.py")
    argv = ["--quick", "--phases", "generate,convert",
            "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]  # fmt: skip
    res = bench.main(argv)
    saved = json.loads((tmp_path / "out" / "bench_scale.json").read_text())
    assert saved["phases"].keys() == {"generate", "convert"} == res["phases"].keys()
    gen = saved["phases"]["generate"]
    assert gen["reused"] is False and gen["returncode"] == 0 and gen["peak_rss_gb"] > 0
    per_day = saved["phases"]["convert"]["per_day"]
    assert [d["day"] for d in per_day] == DAYS
    for d in per_day:
        assert d["requests"] == bench.QUICK["requests_per_day"]
        assert d["seconds"] > 0 and d["requests_per_s"] > 0 and d["peak_rss_gb"] > 0
    assert saved["machine"]["cpu_cores"] >= 1 and saved["machine"]["memory_gb"] > 0
    meta = conv.read_meta(tmp_path / "data" / "parquet")
    assert meta["days"] == DAYS
    # A second run reuses the raw data of the same size and converts again.
    again = bench.main(argv)
    assert again["phases"]["generate"]["reused"] is True
    assert [d["day"] for d in again["phases"]["convert"]["per_day"]] == DAYS


def test_column_min_max_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 1003):
        a = rng.integers(-(10**9), 10**9, (n, 8))
        lo, hi = request_rows._column_min_max(a)
        np.testing.assert_array_equal(lo, a.min(0))
        np.testing.assert_array_equal(hi, a.max(0))


def test_bench_scale_steady_training_from_progress(tmp_path):
    """The day's first report window (its start, the within-day sort included) is reported apart
    from the steady windows."""
    bench = _import("bench_scale", ROOT / "jobs" / "bench_scale.py")
    rows = [  # 1024 requests per step, 2 steps per window
        "kind,global_step,samples_seen,samples_per_s,data_wait_frac",
        "step,2,2048,512.0,0.5",  # 4 s, 2 s of it waiting for the day's first batch
        "step,4,4096,2048.0,0.01",
        "step,6,6144,1024.0,0.03",
        "day,6,6144,,",
    ]
    (tmp_path / "progress.csv").write_text("\n".join(rows) + "\n")
    got = bench._steady_training(tmp_path / "progress.csv")
    assert got["steady_samples_per_s"] == 1536  # median of the later windows
    assert got["steady_data_wait_frac"] == 0.02
    assert got["first_batch_wait_s"] == 2.0
    assert got["first_batch_wait_share"] == round(2.0 / (4 + 1 + 2), 4)
