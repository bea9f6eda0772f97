"""Training: state, step, loop, optimizer, checkpoints, metrics, preemption."""

from jaxlab.train.defaults import base_config, load_config_module, shorten
from jaxlab.train.loop import NonFiniteLossError, RunPreempted, Trainer, train_and_report, train_to_end

__all__ = ["NonFiniteLossError", "RunPreempted", "Trainer", "base_config", "load_config_module", "train_and_report",
           "shorten", "train_to_end"]
