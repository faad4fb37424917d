"""A run can be watched: the progress log writes TensorBoard event files (run.backend=local, no
Ray), read back here record by record with tensorboardX's own protobuf classes."""

from __future__ import annotations

import struct
from pathlib import Path

from local_runs import local_config

from raytopk.train.driver import run
from raytopk.train.tensorboard import TB_DIR


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every events file in ``folder`` (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_a_run_writes_tensorboard_scalars_as_it_reports(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = local_config(tiny, out, "run.report_every_steps=2", "run.eval_max_batches=1",
                       "run.corpus_ms=[]", "run.name=tb")  # fmt: skip
    m = run(cfg, verbose=False)
    got = _scalars(out / TB_DIR)
    steps = [s for s, _ in got["step/loss"]]
    assert steps == sorted(steps) and steps[0] == 2 and len(steps) >= 3  # every report window
    assert all(v > 0 for _, v in got["step/samples_per_s"])
    assert [s for s, _ in got["day/day_loss"]] == [m["global_step"] // 2, m["global_step"]]
    (step, recall), = got["test/joint_recall_10_20"]  # tensorboardX writes "@" as "_"
    assert step == m["global_step"] and abs(recall - m["joint_recall@10@20"]) < 1e-6
    assert not any(tag.endswith(("/rank", "/global_step", "/samples_seen")) for tag in got)


def test_the_event_log_survives_pickling_after_it_opened_its_writer(tmp_path: Path) -> None:
    # Ray pickles the progress log again when it restarts a worker group; the open tensorboardX
    # writer (a multiprocessing queue inside) must not travel with it.
    import pickle

    from raytopk.train.tensorboard import EventLog

    log = EventLog(tmp_path)
    log.write({"kind": "step", "global_step": 1, "loss": 0.5})
    copy = pickle.loads(pickle.dumps(log))
    copy.write({"kind": "step", "global_step": 2, "loss": 0.25})
    log.close()
    copy.close()
    assert sorted(s for s, _ in _scalars(tmp_path / TB_DIR)["step/loss"]) == [1, 2]
