"""lm_small with a mixture of experts in every FFN: 8 SwiGLU experts of width 256, top-2
(Mixtral's routing), dropless, so each token uses the active FFN parameters of
lm_small's dense 512-wide MLP; Switch balancing loss 1e-2, z-loss 1e-3.
  python -m jaxlab.main --config=experiments/configs/moe_small.py --workdir=runs/moe_small
"""

from jaxlab.train import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=384, d_model=192, num_layers=4, num_heads=6, num_kv_heads=2, mlp_dim=512,
      ffns=("moe",), moe_num_experts=8, moe_top_k=2, moe_expert_dim=256,
  )
  config.data.update(source="python_docs", seq_len=128, batch_size=16)
  config.optim.update(learning_rate=3e-3, warmup_steps=50)
  config.train.update(steps=800, eval_every=100, checkpoint_every=200, eval_batches=None)
  return config
