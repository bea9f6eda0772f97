"""Merge, mix or stack models: ``python -m jaxlab.merge --config=FILE --workdir=DIR``.

The config is a run config with a ``merge`` section (`jaxlab.train.merge.merge_section`;
experiments/configs/merge_*.py): the inputs (jaxlab workdirs or Hugging Face Llama
checkpoints), the method and its options, and the validation data the inputs and the
result are scored on. DIR becomes a jaxlab run at step 0 holding the result: resume or
fine-tune it with ``jaxlab.main`` (``--config.init.start_from=DIR``, or
``--config=experiments/configs/from_workdir.py:DIR --workdir=DIR``); ``merge.json``
there reports every input's and the result's validation metrics.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from absl import logging as absl_logging

from jaxlab.cli import define_config_flag

_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory: a new jaxlab run holding the result.")
flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxlab").setLevel(logging.INFO)
  from jaxlab.train.merge import merge_and_report

  report = merge_and_report(_CONFIG.value, _WORKDIR.value)
  summary = {"inputs": {path: m["mean/accuracy"] for path, m in report["inputs"].items()},
             "output": report["output"]["mean/accuracy"]}
  logging.getLogger("jaxlab").info("mean validation accuracy: %s", json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
