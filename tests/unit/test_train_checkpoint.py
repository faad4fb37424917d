"""Checkpoint (de)serialisation (raytopk.train.checkpoint): round trip of every state, RNG
restore, and the errors that name a corrupt or foreign file."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raytopk.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    Position,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from raytopk.train.events import Where


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1))
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([{"params": model.parameters()}, {"params": [w]}], lr=1e-2)
    model(torch.tensor([1, 2])).sum().backward()
    w.sum().backward()
    opt.step()
    pos = Position(
        item=3,
        step=0,
        global_step=17,
        samples_seen=4352,
        train_seconds=1.5,
        days_done=["0:2024-01-13", "0:2024-01-14"],
        starts=1,
    )
    return {
        "scorers": model.state_dict(),
        "loss": {"w": w.detach().clone()},
        "optimizer": opt.state_dict(),
        "rng": rng_state(),
        "position": pos.to_dict(),
        "config": {"run": {"name": "t", "seed": 42}, "op": {"name": "dftopk"}},
    }


def test_round_trip(tmp_path: Path) -> None:
    st = _state()
    save_state(tmp_path, st)
    back = load_state(tmp_path)
    for k, v in st["scorers"].items():
        assert torch.equal(back["scorers"][k], v)
    assert torch.equal(back["loss"]["w"], st["loss"]["w"])
    a, b = st["optimizer"]["state"], back["optimizer"]["state"]
    assert a.keys() == b.keys()
    for i in a:
        assert torch.equal(a[i]["exp_avg"], b[i]["exp_avg"])
        assert torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"])
    assert Position.from_dict(back["position"]) == Position.from_dict(st["position"])
    assert back["config"] == st["config"]
    # A readable copy of the resolved config sits beside the state.
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == st["config"]


def test_rng_state_restores_every_generator(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002  (the legacy global RNG is part of the state)
    random.seed(1)
    st = _state()
    st["rng"] = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    save_state(tmp_path, st)
    torch.manual_seed(99)
    np.random.seed(99)  # noqa: NPY002
    random.seed(99)
    set_rng_state(load_state(tmp_path)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    save_state(tmp_path, _state())
    data = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"state\.pt.*corrupt"):
        load_state(tmp_path)


def test_foreign_file_is_rejected(tmp_path: Path) -> None:
    torch.save({"model": torch.zeros(2)}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="not a raytopk training state"):
        load_state(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state(tmp_path / "nope")


def test_position_ignores_unknown_fields() -> None:
    p = Position.from_dict({"item": 2, "global_step": 5, "future_field": 1})
    assert (p.item, p.global_step, p.step) == (2, 5, 0)


_WHERE = Where(0, 0, "2024-01-14", 1, 2, 1, 1, 16, 0.5)


def test_anytime_curve_survives_a_checkpoint(tmp_path: Path) -> None:
    # A run interrupted after some anytime points and resumed from its checkpoint reports the
    # whole curve, not only the points evaluated after the restart.
    from raytopk.train.anytime import Anytime
    from raytopk.train.config import RunConfig

    run = RunConfig(max_samples=64, eval_at_samples=[16, 32, 48], valid_day="2024-01-15")
    pos = Position(samples_seen=16, global_step=1)
    first = Anytime(run, pos, 1, torch.device("cpu"))
    first.evaluate(_WHERE, pos, lambda: {"joint_recall@10@20": 0.25})
    st = _state()
    st["position"] = pos.to_dict()
    save_state(tmp_path, st)
    back = Position.from_dict(load_state(tmp_path)["position"])
    back.samples_seen, back.global_step = 24, 2  # the checkpoint: between two points
    resumed = Anytime(run, back, 1, torch.device("cpu"))
    assert resumed.done == 1  # the point at 16 is not evaluated again
    back.samples_seen, back.global_step = 32, 3
    assert resumed.due(back)
    report = resumed.evaluate(_WHERE, back, lambda: {"joint_recall@10@20": 0.5})
    assert report.point == 2 and report.valid == {"valid_joint_recall@10@20": 0.5}
    curve = resumed.summary()["anytime_curve"]
    assert [p["valid_joint_recall@10@20"] for p in curve] == [0.25, 0.5]
    assert [p["samples_seen"] for p in curve] == [16, 32]
