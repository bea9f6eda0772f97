"""The main job's data and width with a hybrid stack: Mamba, Mamba-2, GLA and attention
layers in turn (one of each over 4 layers), each followed by the SwiGLU MLP.
  python -m jaxlab.main --config=experiments/configs/hybrid_small.py --workdir=runs/hybrid_small
"""

from jaxlab.train import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=384, d_model=192, num_layers=4, num_heads=6, num_kv_heads=2, mlp_dim=512,
      mixers=("mamba", "mamba2", "gla", "attention"), ssm_chunk=64,
  )
  config.data.update(source="python_docs", seq_len=128, batch_size=16)
  config.optim.update(learning_rate=3e-3, warmup_steps=50)
  config.train.update(steps=800, eval_every=100, checkpoint_every=200, eval_batches=None)
  return config
