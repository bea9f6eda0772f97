"""Merging domains_small's models: the inputs, the method and the data they are scored on.

The run sections are domains_small's (its data: prose, code and arithmetic, scored per
domain); ``merge`` names the inputs and the method (`jaxlab.train.merge.merge_section`).
  python -m jaxlab.merge --config=experiments/configs/merge_small.py \\
      --config.merge.inputs=runs/zoo/code,runs/zoo/prose --config.merge.base=runs/zoo/base \\
      --config.merge.method=ties --workdir=runs/merged
The ``:ARG`` form picks a method with the study's settings: ``merge_small.py:model_glue``.
"""

from pathlib import Path

from jaxlab.train import load_config_module
from jaxlab.train.merge import merge_section


def get_config(method: str = "linear"):
  config = load_config_module(Path(__file__).with_name("domains_small.py")).get_config()
  config.merge = merge_section()
  config.merge.method = method
  config.train.update(steps=100, eval_batches=8)  # steps: a later fine-tune of the result (jaxlab.main)
  return config
