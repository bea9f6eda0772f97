"""Train from a config: ``python -m jaxlab.main --config=FILE --workdir=DIR``.

Overrides go on the command line (``--config.model.num_layers=8``,
``--config.model.head_dim=None``). Multi-host runs pass ``--config.distributed.*`` (or
set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on TPU pods and SLURM,
jax finds its peers by itself.

Exit status: 0 when the run reached ``train.steps``; `jaxlab.cli.EXIT_STOPPED` (75) when
SIGTERM or SIGINT stopped it after a checkpoint (rerun the same command to resume);
1 on an error, with its message (a non-finite loss, a bad config, a checkpoint of
another model).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from jaxlab.cli import EXIT_STOPPED, define_config_flag

_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; a run resumes from it.")
flags.mark_flags_as_required(["workdir"])


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
  if summary["preempted"]:
    sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
  app.run(main)
