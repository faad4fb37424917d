"""Cascade training on a local Ray cluster (127.0.0.1): DDP, resume, worker failure, NaN stop and
the fail-fast checks of raytopk.train.driver, on a tiny synthetic dataset.

Every run is small (a few hundred requests a day, batch 32) so the whole file stays within a few
minutes on two cores; all runs share the session's ``ray_cluster`` cluster.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from ray_procs import free_port, pids_with, stop_processes

from raytopk.metrics import headline_key, metric_keys
from raytopk.train.checkpoint import STATE_FILE, CheckpointError, load_state
from raytopk.train.config import ConfigError, TrainConfig, load_config
from raytopk.train.driver import TrainingStopped, run
from raytopk.train.prepare import latest_checkpoint, prepare

METRIC_KEYS = metric_keys(2)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

# Two training days keep every run short; every day boundary path (checkpoint, resume at the
# next day, restart, streaming evaluation) still runs.
DAYS = ["2024-01-13", "2024-01-14"]
TEST_DAY = "2024-01-15"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytopk.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("tiny_train_data")
    return Path(prepare_synthetic(root, days=len(DAYS) + 1, requests_per_day=240, seed=0))


def _cfg(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(
        None,
        [
            f"data.path={data}",
            f"data.train_days=[{DAYS[0]}..{DAYS[-1]}]",
            f"data.test_day={TEST_DAY}",
            "data.batch_size=32",
            "data.eval_batch_size=64",
            "scaling.use_gpu=false",
            "run.report_every_steps=2",
            "run.corpus_ms=[20]",
            "run.eval_max_batches=2",
            f"run.output_dir={out}",
            "run.name=t",
            *extra,
        ],
    )


class _Collect:
    """Factory of a Ray Train UserCallback that appends every rank's final metrics to a file
    (the callback runs in the controller process, so it cannot hand objects back directly)."""

    @staticmethod
    def make(path: Path) -> Any:
        from ray.train import UserCallback

        class Collect(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001
                if metrics and metrics[0].get("kind") == "final":
                    with open(path, "a") as f:
                        for m in metrics:
                            f.write(json.dumps({"rank": m["rank"], "d": m["param_digest"]}) + "\n")

        return Collect()


def _final_params(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, f"no checkpoint in {out}"
    st = load_state(ckpt)
    return {
        **{f"s.{k}": v for k, v in st["scorers"].items()},
        **{f"l.{k}": v for k, v in st["loss"].items()},
    }


def _steps(out: Path) -> list[dict[str, str]]:
    with open(out / "progress.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster: Any, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted 1-worker run over the three days: the reference for resume tests."""
    out = tmp_path_factory.mktemp("run_uninterrupted")
    metrics = run(_cfg(tiny_data, out, "scaling.num_workers=1"), verbose=False)
    return out, metrics


def test_ddp_two_workers(ray_cluster: Any, tiny_data: Path, tmp_path: Path) -> None:
    """2-worker DDP: bit-identical parameters on both ranks, loss going down, every output,
    streaming evaluation of the next day after each day."""
    out = tmp_path / "ddp"
    digests = tmp_path / "digests.jsonl"
    m = run(
        _cfg(tiny_data, out, "scaling.num_workers=2", "run.stream_eval=true"),
        callbacks=[_Collect.make(digests)],
        verbose=False,
    )
    ranks = [json.loads(line) for line in digests.read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert ranks[0]["d"] == ranks[1]["d"], "DDP replicas diverged"

    steps = _steps(out)
    losses = [float(r["loss"]) for r in steps]
    assert len(losses) >= 4
    assert sum(losses[-2:]) < sum(losses[:2]), f"loss did not decrease: {losses}"
    assert all(r["workers"] == "2" for r in steps)

    assert m["days_trained"] == [f"0:{d}" for d in DAYS]
    for key in (*METRIC_KEYS, "corpus_recall@10@20", "samples_seen", "train_seconds"):
        assert key in m, key
    assert 0.0 <= m["joint_recall@10@20"] <= 1.0
    # Every request of the training days was trained once (counted against the dataset itself).
    assert m["samples_seen"] == _requests(tiny_data, DAYS)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["joint_recall@10@20"] == m["joint_recall@10@20"]
    assert (out / "config.yaml").is_file() and (out / "curves.png").stat().st_size > 0
    # Streaming evaluation (docs/protocol.md §4.4): after each training day d, day d + 1 was
    # evaluated.
    days = _rows(out, "day")
    assert [r["stream_day"] for r in days] == [*DAYS[1:], TEST_DAY]
    assert all(0.0 <= float(r["stream_joint_recall@10@20"]) <= 1.0 for r in days)
    # A checkpoint per day, the latest one after the last day.
    last = load_state(latest_checkpoint(out))
    assert last["position"]["days_done"] == [f"0:{d}" for d in DAYS]


def _requests(data: Path, days: list[str]) -> int:
    import pyarrow.parquet as pq

    from raytopk.data.pipeline import day_files

    return sum(pq.ParquetFile(f).metadata.num_rows for d in days for f in day_files(data, d))


def test_three_stage_cascade_trains_evaluates_and_reports(
    ray_cluster: Any, tiny_data: Path, tmp_path: Path
) -> None:
    """model.stages: [dssm, din, din]: the headline is joint_recall@10@10 (cuts 30, 20, 10), in
    metrics.json, in the progress line and in the table."""
    from raytopk.train.outputs import metrics_table

    out = tmp_path / "three"
    cfg = _cfg(
        tiny_data, out, "scaling.num_workers=1", "model.stages=[dssm,din,din]",
        f"data.train_days=[{DAYS[0]}]",
    )
    m = run(cfg, verbose=False)
    assert headline_key(3) == "joint_recall@10@10"
    for key in (*metric_keys(3), "random_joint_recall@10@10", "random_rank_recall@10@10"):
        assert key in m and 0.0 <= m[key] <= 1.0, key
    assert "| joint_recall@10@10 |" in metrics_table(m, 3)
    assert m["samples_seen"] == _requests(tiny_data, DAYS[:1])


def test_capped_evaluation_reads_only_what_it_scores(
    ray_cluster: Any, tiny_data: Path
) -> None:
    """run.eval_max_batches bounds the pipeline's work, not only what the model scores: a cap of
    2 batches of 16 prepares about 32 requests of the 240-request day, not the day."""
    from raytopk.data.loader import CascadeBatches
    from raytopk.data.pipeline import build_eval_dataset

    ds = build_eval_dataset(tiny_data, [TEST_DAY], batch_size=16, seed=0, max_requests=2 * 16)
    batches = list(CascadeBatches(ds, 16, max_batches=2))
    assert [b.batch_size for b in batches] == [16, 16]
    assert ds.count() == 32  # the dataset itself holds the cap, not the whole day


def test_local_backend_matches_ray_on_one_worker(
    tiny_data: Path, tmp_path: Path, uninterrupted: tuple[Path, dict]
) -> None:
    """run.backend=local (no Ray) trains on the very batches a 1-worker Ray run trains on, so the
    parameters after the same steps are bit-identical, and so are the capped test metrics. (The
    Ray run's plan on the 4-CPU test cluster gives its worker 3 CPUs, so 3 torch threads: the
    local run uses as many, since the thread count can change float reductions.)"""
    _, ref = uninterrupted
    m = run(
        _cfg(tiny_data, tmp_path / "local", "scaling.num_workers=1", "run.backend=local",
             "scaling.cpus_per_worker=3"),
        verbose=False,
    )
    assert m["backend"] == "local" and m["samples_seen"] == ref["samples_seen"]
    assert m["param_digest"] == ref["param_digest"]
    for key in METRIC_KEYS:
        assert m[key] == ref[key], key


def _rows(out: Path, kind: str) -> list[dict[str, str]]:
    with open(out / "progress.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == kind]


def test_resume_gives_the_uninterrupted_parameters(
    ray_cluster: Any, tiny_data: Path, tmp_path: Path, uninterrupted: tuple[Path, dict]
) -> None:
    """Stop after day 1, run again into the same output_dir with all days: it continues at day 2
    and ends with exactly the parameters of the uninterrupted run (1 worker, CPU, seed 42)."""
    ref_out, ref = uninterrupted
    out = tmp_path / "resumed"
    first = run(
        _cfg(tiny_data, out, "scaling.num_workers=1", f"data.train_days=[{DAYS[0]}]"), verbose=False
    )
    assert first["days_trained"] == [f"0:{DAYS[0]}"]
    m = run(_cfg(tiny_data, out, "scaling.num_workers=1"), verbose=False)
    assert m["days_trained"] == [f"0:{d}" for d in DAYS]
    assert m["starts"] == 2  # resumed once: day 1 was not trained again
    assert m["samples_seen"] == ref["samples_seen"]
    a, b = _final_params(ref_out), _final_params(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert m["param_digest"] == ref["param_digest"]


def _ppid(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _train_workers() -> list[int]:
    """PIDs of Ray Train worker processes descended from this test process (the local Ray this
    session started), never anyone else's."""
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "RayTrainWorker" not in cmd:
                continue
            anc = pid
            while anc > 1 and anc != me:
                anc = _ppid(anc)
        except (OSError, ValueError, IndexError):
            continue
        if anc == me:
            out.append(pid)
    return out


def test_worker_killed_restarts_from_checkpoint(
    ray_cluster: Any, tiny_data: Path, tmp_path: Path, uninterrupted: tuple[Path, dict]
) -> None:
    """Kill the worker process once the first day's checkpoint exists: Ray Train restarts the
    worker group from it (max_failures=1), every day is trained exactly once, and the result is
    the uninterrupted run's."""
    ref_out, ref = uninterrupted
    out = tmp_path / "killed"
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline:
            if latest_checkpoint(out) is not None:
                workers = _train_workers()
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        m = run(_cfg(tiny_data, out, "scaling.num_workers=1", "run.max_failures=1"), verbose=False)
    finally:
        stop.set()
        t.join(timeout=5)
    assert killed, "the worker was never killed (run ended before its first checkpoint?)"
    assert m["starts"] == 2, "the run did not restart from a checkpoint"
    assert m["days_trained"] == [f"0:{d}" for d in DAYS]  # each day once
    assert m["samples_seen"] == ref["samples_seen"]
    a, b = _final_params(ref_out), _final_params(out)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the restart"


def test_nan_loss_stops_naming_the_step(ray_cluster: Any, tiny_data: Path, tmp_path: Path) -> None:
    """lr = 1e30 blows the parameters up: the run stops at the first non-finite loss, names the
    step and the loss parts, and keeps the last good (finite) checkpoint."""
    out = tmp_path / "nan"
    with pytest.raises(TrainingStopped) as e:
        run(
            _cfg(
                tiny_data,
                out,
                "scaling.num_workers=1",
                "optim.lr=1e30",
                "run.checkpoint_every_steps=1",
            ),
            verbose=False,
        )
    msg = str(e.value)
    assert "non-finite loss at global step" in msg and "day 2024-01-1" in msg
    assert "total=" in msg and "stage0=" in msg and "joint=" in msg
    assert "last good checkpoint" in msg
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and str(ckpt) in msg
    st = load_state(ckpt)
    step = int(msg.split("global step ")[1].split(" ")[0])
    assert st["position"]["global_step"] == step - 1  # the state just before the bad step
    assert all(torch.isfinite(v).all() for v in st["scorers"].values())


# ---- fail fast: no worker starts ------------------------------------------------------------


def test_missing_data_path_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.path '.*nowhere' does not exist"):
        prepare(_cfg(tmp_path / "nowhere", tmp_path / "o"))


def test_not_a_dataset_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no meta.json"):
        prepare(_cfg(tmp_path, tmp_path / "o"))


def test_unknown_op_fails_fast(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown operator 'topk9000'"):
        _cfg(tiny_data, tmp_path / "o", "op.name=topk9000")


def test_corrupt_checkpoint_fails_fast(
    tiny_data: Path, tmp_path: Path, uninterrupted: tuple[Path, dict]
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted[0], out)
    ckpt = latest_checkpoint(out)
    state = ckpt / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{ckpt.name}/state\.pt.*corrupt"):
        prepare(_cfg(tiny_data, out, "scaling.num_workers=1"))
    # A run that would not fit the checkpoint is refused too, and so is resume=false.
    shutil.rmtree(out)
    shutil.copytree(uninterrupted[0], out)
    with pytest.raises(CheckpointError, match="trained with model="):
        prepare(_cfg(tiny_data, out, "scaling.num_workers=1", "model.dim=4"))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        prepare(_cfg(tiny_data, out, "scaling.num_workers=1", "run.resume=false"))


# ---- `ray job submit` to a `ray start --head` cluster on 127.0.0.1 --------------------------

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_ray_job_submit_quickstart(tmp_path: Path) -> None:
    """The quickstart command, unchanged, submitted with `ray job submit` to a head node started
    with `ray start --head` on 127.0.0.1, token authentication on both sides (the job server
    refuses a request without the token), on a smaller synthetic dataset. Only the processes this
    test started are stopped, also when it fails."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
    }
    env.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="rtkjob")  # short: Ray's socket paths must stay < 108 chars
    dash = free_port()
    out = tmp_path / "out"

    def sh(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    try:
        head = sh(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                f"--port={free_port()}",
                f"--temp-dir={tmp}",
                "--num-cpus=2",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                "--object-store-memory=300000000",
                "--disable-usage-stats",
                # Own ports for every agent: the session's local Ray may hold the defaults.
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ],
            timeout=120,
        )
        assert head.returncode == 0, head.stdout + head.stderr
        _assert_refused_without_token(f"http://127.0.0.1:{dash}/api/jobs/")
        submit = [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"excludes": [".venv", "runs", "data", ".git"]}),
            "--",
            "python",
            "jobs/train.py",
            "--config",
            "jobs/configs/quickstart.yaml",
            f"data.synthetic.root={out}/data",
            f"data.synthetic.days={len(DAYS) + 1}",
            "data.synthetic.requests_per_day=300",
            "data.batch_size=64",
            "run.epochs=1",
            "run.eval_max_batches=2",
            "run.corpus_ms=[100]",
            f"run.output_dir={out}/run",
        ]
        # The job agent comes up a few seconds after `ray start` returns; the server answers
        # "No available agent to submit job" until then.
        deadline = time.monotonic() + 90
        while True:
            job = sh(submit, timeout=480)
            log = job.stdout + job.stderr
            if "No available agent" not in log or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, log[-4000:]
        assert "joint_recall@10@20" in log and "random selection" in log, log[-3000:]
        m = json.loads((out / "run" / "metrics.json").read_text())
        for key in (*METRIC_KEYS, "corpus_recall@10@100", "samples_seen", "train_seconds"):
            assert key in m, key
        assert m["num_workers"] == 2 and m["days_trained"] == [f"0:{d}" for d in DAYS]
        assert (out / "run" / "curves.png").is_file()
    finally:
        stop_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not pids_with(tmp), "processes of the test cluster survived"


def _assert_refused_without_token(url: str) -> None:
    """The dashboard's job API (what `ray job submit` talks to) answers 401/403 to a request
    without the cluster's token (it listens on 127.0.0.1 here; the GCS on every interface)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=10)
        except urllib.error.HTTPError as e:
            assert e.code in (401, 403), f"{url}: HTTP {e.code} without a token"
            return
        except (urllib.error.URLError, ConnectionError):  # the server is still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
            continue
        raise AssertionError(f"{url} answered a request that carried no token")
