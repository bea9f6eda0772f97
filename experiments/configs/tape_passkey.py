"""Passkey retrieval for the TAPE study; ``--config=...:PE[,SIZE]`` as tape_arithmetic.

Trained on contexts of 24-64 tokens; experiments/tape_arithmetic/run.py evaluates
retrieval accuracy at 32-512 tokens.
"""

from jaxlab.train import base_config

SIZES = {
    "cpu": dict(model=dict(d_model=64, num_layers=3, num_heads=4, mlp_dim=256),
                data=dict(batch_size=32), train=dict(steps=600), optim=dict(learning_rate=2e-3, warmup_steps=100)),
    "accelerator": dict(model=dict(d_model=512, num_layers=8, num_heads=8, mlp_dim=2048),
                        data=dict(batch_size=128), train=dict(steps=10_000),
                        optim=dict(learning_rate=5e-4, warmup_steps=1000)),
}


def get_config(arg: str = "rope"):
  positional, _, size = arg.partition(",")
  size = size or "cpu"
  config = base_config()
  config.model.update(vocab_size=32, num_kv_heads=None, positional=positional, tape_position_size=16,
                      **SIZES[size]["model"])
  config.data.update(source="passkey", seq_len=64, **SIZES[size]["data"])
  config.data.passkey.update(min_len=24, max_len=64, digits=5, num_train=10_000_000, num_eval=256)
  config.optim.update(**SIZES[size]["optim"])
  steps = SIZES[size]["train"]["steps"]
  config.train.update(steps=steps, eval_every=steps, eval_batches=4, checkpoint_every=steps,
                      num_samples=0)
  return config
