"""Reversed-digit addition for the TAPE study; ``--config=...:PE[,SIZE]``.

PE is rope | none | alibi | tape; SIZE is ``cpu`` (default: minutes on 2 cores) or
``accelerator`` (the scale of the paper's arithmetic runs, for a GPU or TPU host).
Trained on operands of 1-8 digits; experiments/tape_arithmetic/run.py evaluates
exact match at 1-12 and 16 digits.
"""

from jaxlab.train import base_config

SIZES = {
    "cpu": dict(model=dict(d_model=64, num_layers=3, num_heads=4, mlp_dim=256),
                data=dict(batch_size=64), train=dict(steps=1400), optim=dict(learning_rate=3e-3, warmup_steps=100)),
    "accelerator": dict(model=dict(d_model=512, num_layers=8, num_heads=8, mlp_dim=2048),
                        data=dict(batch_size=256), train=dict(steps=20_000),
                        optim=dict(learning_rate=5e-4, warmup_steps=1000)),
}


def get_config(arg: str = "rope"):
  positional, _, size = arg.partition(",")
  size = size or "cpu"
  config = base_config()
  config.model.update(vocab_size=16, num_kv_heads=None, positional=positional, tape_position_size=16,
                      **SIZES[size]["model"])
  config.data.update(source="addition", seq_len=28, **SIZES[size]["data"])
  config.data.addition.update(min_digits=1, max_digits=8, num_train=10_000_000, num_eval=512)
  config.optim.update(weight_decay=0.1, **SIZES[size]["optim"])
  steps = SIZES[size]["train"]["steps"]
  config.train.update(steps=steps, eval_every=steps, eval_batches=8, checkpoint_every=steps,
                      num_samples=0)
  return config
