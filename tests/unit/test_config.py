"""Training config (docs/design.md, Configuration): every YAML in jobs/configs loads and validates,
overrides convert types, unknown keys are rejected with the list of valid ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raytopk.ops import get_spec, list_ops
from raytopk.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    expand_days,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
    valid_keys,
    validate,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert "quickstart" in names
    for op in list_ops():  # one paper-settings config per registered operator
        assert f"recflow_{op}" in names


def _entry_script(path: Path) -> str:
    """The jobs/ script a YAML's first line runs (every YAML opens with its exact command)."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and path.name in first, (
        f"{path.name} must open with the exact command that runs it, got {first!r}"
    )
    scripts = [s for s in ("jobs/train.py", "jobs/study.py") if s in first]
    assert len(scripts) == 1, f"{path.name}: first line runs no known entry script: {first!r}"
    return scripts[0]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_yaml_loads_and_validates(path: Path) -> None:
    if _entry_script(path) == "jobs/study.py":
        # A study YAML: its train: section is a TrainConfig and must validate like the others.
        from raytopk.tune.study import load_study

        _, cfg = load_study(path)
        cfg = validate(cfg)
    else:
        cfg = load_config(path)
    assert cfg.op.name in list_ops()
    assert get_spec(cfg.op.name).param in cfg.op.params
    assert len(cfg.loss.ks) == len(cfg.model.stages)
    # The resolved config round-trips through YAML unchanged (it is saved with checkpoints).
    assert validate(from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))) == cfg


@pytest.mark.parametrize("op", list_ops())
def test_recflow_configs_follow_the_paper(op: str) -> None:
    """docs/protocol.md §4.4 settings and the §2.5 operator values in every recflow_<op>.yaml
    (the registry's default is that value: test_ops_contract.py checks it against the table)."""
    cfg = load_config(CONFIGS[0].parent / f"recflow_{op}.yaml")
    assert cfg.op.name == op
    assert cfg.op.params[get_spec(op).param] == get_spec(op).default
    assert cfg.data.train_days[0] == "2024-01-13" and cfg.data.train_days[-1] == "2024-02-03"
    assert len(cfg.data.train_days) == 22
    assert cfg.data.test_day == "2024-02-04"
    assert (cfg.data.batch_size, cfg.model.dim, cfg.optim.lr, cfg.run.seed) == (1024, 8, 1e-2, 42)
    assert cfg.model.stages == ["dssm", "din"]
    assert cfg.scaling.use_gpu in (True, "auto")


def test_quickstart_is_self_contained() -> None:
    cfg = load_config(CONFIGS[0].parent / "quickstart.yaml")
    assert cfg.data.synthetic.enabled
    assert cfg.op.name == "dftopk"
    assert cfg.scaling.num_workers == 2
    assert cfg.run.output_dir == "runs/quickstart"


def test_overrides_convert_types() -> None:
    cfg = load_config(
        None,
        [
            "data.synthetic.enabled=true",
            "op.name=lapsum",
            "op.params.alpha=5",
            "optim.lr=1e-3",
            "loss.ks=[30,20]",
            "run.output_dir=/tmp/x",
            "scaling.use_gpu=false",
            "scaling.cpus_per_worker=0.5",
            "data.train_days=[2024-01-13..2024-01-15]",
            "run.stream_eval=yes",
            "optim.amp=true",
        ],
    )
    assert cfg.optim.amp is True
    assert cfg.op.name == "lapsum" and cfg.op.params == {"alpha": 5.0}
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.loss.ks == [30, 20]
    assert cfg.run.output_dir == "/tmp/x"
    assert cfg.scaling.use_gpu is False and cfg.scaling.cpus_per_worker == 0.5
    assert cfg.data.train_days == ["2024-01-13", "2024-01-14", "2024-01-15"]
    assert cfg.run.stream_eval is True


def test_defaults_are_the_paper_protocol() -> None:
    cfg = validate(apply_overrides(TrainConfig(), parse_overrides(["data.path=/d"])))
    assert (cfg.data.batch_size, cfg.model.dim, cfg.optim.lr, cfg.run.seed) == (1024, 8, 1e-2, 42)
    assert cfg.loss.ks == [10, 10]  # k = K = 10 per stage (docs/protocol.md §3.2)
    assert cfg.op.params == {"tau": get_spec("dftopk").default}
    assert cfg.run.output_dir == "runs/run"


@pytest.mark.parametrize(
    ("override", "needle", "section"),
    [
        ("run.nmae=x", "'run.nmae'", "run."),
        ("optimizer.lr=1", "'optimizer'", ""),
        ("data.synthetic.dayz=3", "'data.synthetic.dayz' (did you mean 'data.synthetic.days'?)",
         "data.synthetic."),
    ],
)
def test_unknown_keys_list_the_valid_ones(override: str, needle: str, section: str) -> None:
    """The message names the key and lists every valid key of the section it was looked up in
    (all keys for an unknown top-level section)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=/d", override])
    msg = str(e.value)
    assert needle in msg and "valid keys" in msg
    valid_here = [k for k in valid_keys(TrainConfig) if k.startswith(section)]
    assert len(valid_here) >= 5
    for key in valid_here:
        assert key in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("data: {path: /d}\nrun:\n  seeed: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'run\.seeed'.*run\.seed"):
        load_config(p)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("op.name=nosuchop", "op.name: unknown operator 'nosuchop'"),
        ("model.stages=[dssm,mlp]", "model.stages[1]: unknown scorer 'mlp'"),
        ("loss.ks=[10]", "loss.ks has 1 entries"),
        ("run.seed=abc", "run.seed: expected an integer, got 'abc'"),
        ("data.batch_size=0", "data.batch_size must be > 0, got 0"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu"),
        ("optim.amp=fp16", "optim.amp must be auto, true or false, got 'fp16'"),
        ("scaling.cpus_per_worker=-1", "scaling.cpus_per_worker must be > 0"),
        ("data.train_days=[2024-01-15..2024-01-13]", "ends before it starts"),
        ("data.train_days=[2024-13-01]", "'2024-13-01' is not YYYY-MM-DD"),
        ("data.test_day=2024-02-30", "data.test_day"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("loss.ks=[10, x]", "loss.ks[1]: expected an integer, got 'x'"),
        ("run.name=a/b", "run.name"),
        ("run=1", "is a section"),
        ("op.params.tau.x=1", "holds one level of names"),
        ("run.seed.x=1", "is a value, not a section"),
        ("run.seed", "not of the form key=value"),
        ("op.name=bce|op.params.tau=1", "op.params: 'bce' is a baseline"),
        ("op.params.tau=-1", "op.params of dftopk: 'tau' should be > 0 but got -1.0"),
        ("op.params.tau=.nan", "op.params of dftopk: 'tau' should be finite"),
        ("op.params.tau=hot", "op.params.tau: expected a number, got 'hot'"),
        ("op.name=lapsum|op.params.tau=1", "op.params of lapsum: 'op_params' has keys ['tau']"),
        ("loss.form=hinge", "loss.form: loss form 'hinge' is not available for 'dftopk'"),
        ("op.name=neuralsort|loss.form=mse", "loss.form: loss form 'mse' is not available"),
        ("op.name=bce|loss.form=mse", "not available for 'bce'"),
    ],
)
def test_bad_values_name_key_and_value(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=/d", *override.split("|")])
    assert needle in str(e.value)


def test_bce_baseline_and_loss_forms_resolve() -> None:
    from raytopk.losses import default_form

    cfg = load_config(None, ["data.path=/d", "op.name=bce"])
    assert cfg.op.params == {} and cfg.loss.form == "bce"
    for op in ("dftopk", "lapsum", "sparse_topk", "neuralsort"):
        cfg = load_config(None, ["data.path=/d", f"op.name={op}"])
        assert cfg.loss.form == default_form(op)  # "auto" is resolved into the saved config
    cfg = load_config(None, ["data.path=/d", "op.name=sparse_topk", "loss.form=bce_logits"])
    assert cfg.loss.form == "bce_logits"


def test_missing_data_path_is_rejected() -> None:
    with pytest.raises(ConfigError, match="data.path is empty"):
        load_config(None, [])


def test_bad_date_in_yaml_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "dates.yaml"
    p.write_text("data:\n  path: /d\n  train_days: [2024-13-01]\n")
    with pytest.raises(ConfigError, match="'2024-13-01' is not YYYY-MM-DD"):
        load_config(p)
    # Unquoted valid dates stay day strings (not datetime.date objects).
    p.write_text("data:\n  path: /d\n  train_days: [2024-01-13]\n  test_day: 2024-01-14\n")
    cfg = load_config(p)
    assert cfg.data.train_days == ["2024-01-13"] and cfg.data.test_day == "2024-01-14"


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_expand_days_ranges_in_order() -> None:
    assert expand_days(["2024-01-30..2024-02-02", "2024-02-04"]) == [
        "2024-01-30",
        "2024-01-31",
        "2024-02-01",
        "2024-02-02",
        "2024-02-04",
    ]
    with pytest.raises(ConfigError, match="date order"):
        expand_days(["2024-02-04", "2024-01-30"])
    with pytest.raises(ConfigError, match="twice"):
        expand_days(["2024-01-30..2024-02-01", "2024-01-31"])


def test_resolution_is_idempotent() -> None:
    cfg = load_config(None, ["data.path=/d", "op.name=diffsort"])
    assert validate(cfg) == cfg
    assert cfg.op.params == {"steepness": get_spec("diffsort").default}


# ---- scaling: how the driver sizes Train workers (docs/ray.md §5.1, the starvation hang) ----


def _scaling(*overrides: str):
    return load_config(None, ["data.path=/d", *overrides]).scaling


def _plan(scaling, cluster: dict[str, float]):
    from raytopk.train.resources import plan_resources

    p = plan_resources(
        cluster, num_workers=scaling.num_workers, cpus_per_worker=scaling.cpus_per_worker,
        use_gpu=scaling.use_gpu, concurrent=1,
    )
    return p.use_gpu, p.cpus_per_worker, p.threads


def test_auto_cpus_leave_one_cpu_to_ray_data() -> None:
    # 2 cores, 2 workers: 0.5 CPU each, 1 CPU stays with Ray Data; torch gets 1 thread.
    assert _plan(_scaling(), {"CPU": 2.0}) == (False, 0.5, 1)
    # A bigger machine keeps a quarter of it for Ray Data.
    assert _plan(_scaling(), {"CPU": 16.0}) == (False, 6.0, 6)
    # GPUs when the cluster has them (use_gpu: auto), one per worker.
    assert _plan(_scaling(), {"CPU": 8.0, "GPU": 2.0})[0] is True
    assert _plan(_scaling("scaling.use_gpu=false"), {"CPU": 8.0, "GPU": 2.0})[0] is False


def test_resources_that_would_starve_ray_data_are_refused() -> None:
    with pytest.raises(ValueError, match=r"2 worker\(s\) x cpus_per_worker=1\) leave less"):
        _plan(_scaling("scaling.cpus_per_worker=1"), {"CPU": 2.0})
    with pytest.raises(ValueError, match="too few for 2 worker"):
        _plan(_scaling(), {"CPU": 1.0})
    with pytest.raises(ValueError, match=r"needs 2 GPU\(s\); the cluster has 1"):
        _plan(_scaling("scaling.use_gpu=true"), {"CPU": 8.0, "GPU": 1.0})


def test_metrics_table_prints_the_random_baseline() -> None:
    from raytopk.train.outputs import metrics_table

    table = metrics_table(
        {
            "joint_recall@10@20": 0.42,
            "random_joint_recall@10@20": 0.1,
            "retrieval_recall@10@30": 0.5,
            "random_retrieval_recall@10@30": 0.15,
            "corpus_recall@10@100": 0.2,
            "random_corpus_recall@10@100": 0.025,
            "samples_seen": 1000,
            "train_seconds": 12.5,
        }
    )
    assert "| joint_recall@10@20 | 0.4200 | 0.1000 |" in table
    assert "| corpus_recall@10@100 | 0.2000 | 0.0250 |" in table
    assert "1,000 training samples" in table


def test_three_stage_names_reach_every_report() -> None:
    """A 3-stage cascade's headline (joint_recall@10@10) is in the console line and the table."""
    from raytopk.metrics import headline_key, metric_keys
    from raytopk.train.outputs import metrics_table, progress_line

    assert headline_key(3) == "joint_recall@10@10"
    m = {key: 0.25 for key in metric_keys(3)}
    m.update({"kind": "final", "test_day": "2024-01-16", "random_joint_recall@10@10": 0.05})
    line = progress_line("r", m, 3)
    table = metrics_table(m, 3)
    for key in metric_keys(3):
        assert f"{key}=0.2500" in line
        assert f"| {key} | 0.2500 |" in table
    assert "| joint_recall@10@10 | 0.2500 | 0.0500 |" in table


def test_stage_ks_must_fit_the_candidates_and_not_grow() -> None:
    from raytopk.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"loss.ks\[0\]=50: stage 0 would keep all 40 "):
        load_config(None, ["data.path=/d", "loss.ks=[50,10]"])
    with pytest.raises(ConfigError, match=r"loss.ks\[0\]=40"):
        load_config(None, ["data.path=/d", "loss.ks=[40,10]"])
    load_config(None, ["data.path=/d", "loss.ks=[50,10]", "data.sample_num=160"])  # N = 200
    with pytest.raises(ConfigError, match=r"stage 1 keeps 30 but stage 0 hands it only 10"):
        load_config(None, ["data.path=/d", "loss.ks=[10,30]"])
