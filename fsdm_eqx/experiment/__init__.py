"""The few-shot experiment: train FSDM on training classes, evaluate on unseen classes.

`config` holds `ExperimentConfig` and the named `PRESETS`; `run` trains and writes a run
directory (`run_experiment`); `evaluate` is the final evaluation on unseen classes; `cli` is the
command line (`main`) generated from the configs.
"""

from .cli import main as main
from .config import (
    PRESETS as PRESETS,
    ExperimentConfig as ExperimentConfig,
    experiment_config_from_dict as experiment_config_from_dict,
)
from .evaluate import FID_METRICS as FID_METRICS, SUMMARY_METRICS as SUMMARY_METRICS
from .run import run_experiment as run_experiment
