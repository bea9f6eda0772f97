"""A seconds-long run of the same pipeline, for tests and smoke checks."""

from jaxlab.train import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=264, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
  )
  config.data.update(source="python_docs", seq_len=32, batch_size=8)
  config.optim.update(learning_rate=3e-3, warmup_steps=2)
  config.train.update(
      steps=8, eval_every=4, eval_batches=2, checkpoint_every=4, num_samples=2, sample_tokens=16,
  )
  return config
