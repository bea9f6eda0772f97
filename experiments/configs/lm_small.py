"""The README's main job: a 4-layer byte-level Llama-style LM on CPython's docs.

1.8M parameters, 800 steps of 16 x 128 tokens (about 3.7 epochs of the corpus);
a few minutes on a 2-core CPU.
  python -m jaxlab.main --config=experiments/configs/lm_small.py --workdir=runs/lm_small
"""

from jaxlab.train import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=384, d_model=192, num_layers=4, num_heads=6, num_kv_heads=2, mlp_dim=512,
  )
  config.data.update(source="python_docs", seq_len=128, batch_size=16)
  config.optim.update(learning_rate=3e-3, warmup_steps=50)
  config.train.update(steps=800, eval_every=100, checkpoint_every=200, eval_batches=None)
  return config
