"""The sample-scaling study submitted with `ray job submit` to a two-node Ray cluster on this
machine (a head and a worker node on 127.0.0.1, each with its own resources and temp dir).

Checks: trials ran on both nodes, results.csv is complete, and re-running the same job resumes
the study without redoing finished trials. Only the processes this test started are stopped
(found by their temp dir), also when the test fails.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_procs import free_port, stop_processes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "token",  # on both sides; the same ~/.ray/auth_token
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # `python` inside the submitted job must be this environment's interpreter.
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}
ENV.pop("RAY_ADDRESS", None)

pytestmark = [pytest.mark.ray, pytest.mark.cluster]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def two_node_cluster() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="rtk")  # short: Ray's socket paths must stay < 108 chars
    port, dash = free_port(), free_port()
    common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1", "--num-cpus=2"]

    def own_ports() -> list[str]:
        # Two nodes on one machine: each node's agents need ports of their own (the defaults
        # would collide, and the head's job agent would never come up).
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]

    try:
        head = _run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={tmp}/head",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                '--resources={"study_slot": 1}',
                "--object-store-memory=300000000",
                f"--ray-client-server-port={free_port()}",
                *common,
                *own_ports(),
            ],
            timeout=120,
        )
        assert head.returncode == 0, head.stdout + head.stderr
        worker = _run(
            [
                str(BIN / "ray"),
                "start",
                f"--address=127.0.0.1:{port}",
                f"--temp-dir={tmp}/worker",
                '--resources={"study_slot": 1}',
                "--object-store-memory=300000000",
                *common,
                *own_ports(),
            ],
            timeout=120,
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield f"http://127.0.0.1:{dash}"
    finally:
        stop_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(address: str, out: Path, timeout: float) -> subprocess.CompletedProcess:
    # The head's job agent starts a few seconds after `ray start` returns.
    deadline = time.time() + 90
    while True:
        done = _submit_once(address, out, timeout)
        if "No available agent" not in done.stderr + done.stdout or time.time() > deadline:
            return done
        time.sleep(3)


def _submit_once(address: str, out: Path, timeout: float) -> subprocess.CompletedProcess:
    return _run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address={address}",
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"excludes": [".venv", "runs", "data", ".git"]}),
            "--",
            "python",
            "jobs/study.py",
            "--config",
            "jobs/configs/study_quick.yaml",
            "study.ops=[dftopk,softsort]",
            "study.trial_backend=ray",  # a TorchTrainer inside each Tune trial (docs/ray.md §6)
            "study.sample_nums=[0]",
            "study.budget_seconds=8",  # one step must fit: 4 s was exceeded on a loaded 2-core VM
            "study.max_concurrent=2",
            "study.workers_per_trial=1",
            "study.cpus_per_worker=0.5",
            'study.trial_resources={"study_slot": 1}',
            f"study.output_dir={out}",
            f"study.results_dir={out}/results",  # reports and row log apart, as in docs/studies
            "train.run.eval_max_batches=2",
            "train.run.corpus_ms=[100]",
            f"train.data.synthetic.root={out}/data",
            "train.data.synthetic.requests_per_day=800",
        ],
        timeout=timeout,
    )


@pytest.mark.timeout(900)
def test_quick_study_on_two_nodes_and_resume(two_node_cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "study"
    first = _submit(two_node_cluster, out, timeout=600)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    with (out / "results" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["op"] for r in rows) == ["dftopk", "softsort"], log[-3000:]
    assert all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        assert int(r["samples_seen"]) > 0 and float(r["train_seconds"]) > 0
        assert 0.0 <= float(r["joint_recall@10@20"]) <= 1.0
    assert len({r["node"] for r in rows}) == 2, rows  # one trial per node (study_slot)
    res = out / "results"
    assert (res / "results.md").is_file() and (res / "sample_scaling.png").is_file()
    assert (res / "trials.jsonl").is_file() and not (out / "results.md").exists()
    assert "| dftopk |" in log  # the command prints the report it wrote (results_dir)

    # Same command again: the finished trials are found (same training config) and not run again.
    before = {r["trial"]: r["wall_seconds"] for r in rows}
    again = _submit(two_node_cluster, out, timeout=300)
    log2 = again.stdout + again.stderr
    assert again.returncode == 0, log2[-4000:]
    assert "2 of 2 trial(s) already in" in log2, log2[-3000:]  # the row log's message
    with (out / "results" / "results.csv").open() as f:
        rows2 = list(csv.DictReader(f))
    assert {r["trial"]: r["wall_seconds"] for r in rows2} == before
