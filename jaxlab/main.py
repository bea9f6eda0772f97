"""Train from a config: ``python -m jaxlab.main --config=FILE --workdir=DIR``.

Overrides go on the command line (``--config.model.num_layers=8``). Multi-host runs
pass ``--config.distributed.*`` (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); on TPU pods and SLURM, jax finds its peers by itself.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; a run resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(distributed) -> None:
  """Joins a multi-host run when one is configured (flags, environment, or a cluster)."""
  import jax

  address = distributed.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = int(os.environ.get("JAX_NUM_PROCESSES", distributed.num_processes))
  process_id = int(os.environ.get("JAX_PROCESS_ID", distributed.process_id))
  if not address and num_processes == 1:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; no-op elsewhere
  jax.distributed.initialize(address or None, num_processes=num_processes, process_id=process_id)


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax are chatty at INFO
  logging.getLogger("jaxlab").setLevel(logging.INFO)
  config = _CONFIG.value
  initialize_distributed(config.distributed)
  from jaxlab.train import train_and_report

  summary = train_and_report(config, _WORKDIR.value)
  logging.getLogger("jaxlab").info("done: %s", summary)


if __name__ == "__main__":
  app.run(main)
