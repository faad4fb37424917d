"""The sample-scaling study on Ray Tune (docs/protocol.md §6): operators compared at equal compute,
each operator's parameter selected on a validation day, paired seeds, anytime curves."""

from raytopk.tune.results import write_reports
from raytopk.tune.study import StudyConfig, load_study, run_study, trial_configs

__all__ = ["StudyConfig", "load_study", "run_study", "trial_configs", "write_reports"]
