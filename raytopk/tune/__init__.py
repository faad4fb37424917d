"""The sample-scaling study on Ray Tune (SPEC.md §6): operators compared at equal compute."""

from raytopk.tune.study import StudyConfig, load_study, run_study, trial_configs, write_reports

__all__ = ["StudyConfig", "load_study", "run_study", "trial_configs", "write_reports"]
