"""The gated-attention study's LM; ``--config=...:GATE[,SIZE]``.

GATE is none | elementwise | headwise: the sigmoid output gate of Qiu et al. 2025 (G1,
after SDPA, read from the block's normalized input), per head and channel or one per
head. SIZE is ``cpu`` (minutes on 2 cores) or ``accelerator``. A byte-level Llama-style
model on the bundled corpus; experiments/gated_attention/run.py narrows the gated
models' MLP to the baseline's parameter count, as the paper does for its dense models.
"""

from jaxlab.train import base_config

SIZES = {
    "cpu": dict(model=dict(d_model=128, num_layers=4, num_heads=4, mlp_dim=384), data=dict(seq_len=128, batch_size=16),
                train=dict(steps=600), optim=dict(learning_rate=3e-3, warmup_steps=50)),
    "accelerator": dict(model=dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=2048),
                        data=dict(seq_len=1024, batch_size=64), train=dict(steps=20_000),
                        optim=dict(learning_rate=1e-3, warmup_steps=1000)),
}
GATES = {"none": None, "elementwise": "elementwise", "headwise": "headwise"}


def get_config(arg: str = "none"):
  gate, _, size = arg.partition(",")
  size = size or "cpu"
  config = base_config()
  config.model.update(vocab_size=384, num_kv_heads=None, attention_gate=GATES[gate], **SIZES[size]["model"])
  config.data.update(source="python_docs", **SIZES[size]["data"])
  config.optim.update(**SIZES[size]["optim"])
  steps = SIZES[size]["train"]["steps"]
  config.train.update(steps=steps, eval_every=steps, eval_batches=None, checkpoint_every=steps, num_samples=0)
  return config
