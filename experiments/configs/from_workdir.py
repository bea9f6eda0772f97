"""The config a run wrote to its workdir (``config.json``), e.g. a ``jaxlab.merge`` output:
  python -m jaxlab.main --config=experiments/configs/from_workdir.py:runs/merged --workdir=runs/merged
resumes that run (a merge's: trains it from step 0 for its ``train.steps``); overrides
apply on top (``--config.optim.trainable=router`` trains a mixture's routers only)."""

import json
from pathlib import Path

import ml_collections

from jaxlab.train import base_config
from jaxlab.train.merge import merge_section


def get_config(workdir: str):
  config = base_config()
  written = json.loads((Path(workdir) / "config.json").read_text())
  if "merge" in written:  # a jaxlab.merge output: its section keeps its field types
    config.merge = merge_section()
  config.update(ml_collections.ConfigDict(written))
  return config
