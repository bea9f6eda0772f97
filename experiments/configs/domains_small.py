"""lm_small's model on three domains at once: CPython's docs (prose), the standard
library's source (code) and reversed-digit addition (arithmetic), equally weighted.

The same 1.8M-parameter byte-level LM and 800 steps of 16 x 128 tokens as lm_small;
every eval also reports each domain's loss (eval/<domain>/loss, ...).
  python -m jaxlab.main --config=experiments/configs/domains_small.py --workdir=runs/domains_small
"""

from jaxlab.train import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=384, d_model=192, num_layers=4, num_heads=6, num_kv_heads=2, mlp_dim=512,
  )
  config.data.update(
      source="domains", seq_len=128, batch_size=16,
      domains=dict(python_docs="builtin", python_stdlib="builtin", arithmetic="builtin"),
      domain_weights=dict(python_docs=1.0, python_stdlib=1.0, arithmetic=1.0),  # settable one by one
  )
  config.optim.update(learning_rate=3e-3, warmup_steps=50)
  config.train.update(steps=800, eval_every=100, checkpoint_every=200, eval_batches=None)
  return config
