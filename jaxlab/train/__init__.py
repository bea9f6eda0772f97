"""Training: state, step, loop, optimizer, checkpoints, metrics, preemption."""

from jaxlab.train.defaults import base_config, load_config_module
from jaxlab.train.loop import NonFiniteLossError, Trainer, train_and_report

__all__ = ["NonFiniteLossError", "Trainer", "base_config", "load_config_module", "train_and_report"]
