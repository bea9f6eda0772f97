"""Multi-query associative recall (Zoology's MQAR) for the SSM recall study
(experiments/ssm_recall): ``--config=experiments/configs/ssm_recall.py:MODEL,DEPTH[,SIZE[,DT_INIT]]``.

MODEL is one of attention, mamba, mamba_both, mamba_one, mamba_zero (Mamba without and
with polarization), mamba2, gla; DEPTH the number of layers; SIZE ``cpu`` (the study
as run on 2 CPU cores: vocabulary 64, trained on length 64 with 8 pairs, tested up to
length 256 with 30 pairs) or ``accelerator`` (the paper's scale: vocabulary 8192,
length 1024, 256 pairs, d_model 128). As in Zoology and SSM-Bottleneck the blocks have
no MLP, and each family trains at its own learning rate (Zoology reports the best of a
sweep; ``LEARNING_RATES`` holds the best of 1e-3, 2e-3 and 3e-3 in a 3,000-step probe:
attention does not learn at 3e-3, Mamba not at 1e-3). DT_INIT ``mamba`` (default) is
Mamba's step-size init, Δ log-uniform in [1e-3, 0.1]; ``zero_bias`` is what
SSM-Bottleneck's runs had: its ``_init_weights`` zeroes ``dt_proj.bias``, so every
channel starts at Δ = softplus(0) = log 2 (its learned states then forget fast).
"""

import math

from jaxlab.train import base_config

MODELS = {
    "attention": dict(mixers=("attention",), num_heads=2, positional="rope"),
    "mamba": dict(mixers=("mamba",), ssm_state=16),
    "mamba_both": dict(mixers=("mamba",), ssm_state=16, polarization="both"),
    "mamba_one": dict(mixers=("mamba",), ssm_state=16, polarization="one"),
    "mamba_zero": dict(mixers=("mamba",), ssm_state=16, polarization="zero"),
    "mamba2": dict(mixers=("mamba2",), ssm_state=64, ssm_head_dim=32),
    "gla": dict(mixers=("gla",), gla_heads=2),
}
# Per-family learning rate on CPU; the accelerator size scales them by 1/3.
LEARNING_RATES = {"attention": 1e-3}
DEFAULT_LEARNING_RATE = 3e-3
SIZES = {
    "cpu": dict(model=dict(d_model=64, vocab_size=64), data=dict(seq_len=64, batch_size=16),
                mqar=dict(num_kv_pairs=8), train=dict(steps=2500), optim=dict(warmup_steps=100), lr_scale=1.0),
    "accelerator": dict(model=dict(d_model=128, vocab_size=8192), data=dict(seq_len=1024, batch_size=64),
                        mqar=dict(num_kv_pairs=256), train=dict(steps=20_000),
                        optim=dict(warmup_steps=1000), lr_scale=1 / 3),
}
DT_INITS = {"mamba": {}, "zero_bias": dict(ssm_dt_min=math.log(2), ssm_dt_max=math.log(2))}


def get_config(arg: str = "mamba,2"):
  model, depth, *rest = arg.split(",")
  size = SIZES[rest[0] if rest else "cpu"]
  dt_init = rest[1] if len(rest) > 1 else "mamba"
  config = base_config()
  config.model.update(ffns=("none",), num_layers=int(depth), ssm_chunk=64, **MODELS[model], **size["model"],
                      **DT_INITS[dt_init])
  config.data.update(source="mqar", **size["data"])
  config.data.mqar.update(vocab_size=size["model"]["vocab_size"], num_train=10_000_000, num_eval=512,
                          random_non_queries=False, **size["mqar"])
  learning_rate = LEARNING_RATES.get(model, DEFAULT_LEARNING_RATE) * size["lr_scale"]
  config.optim.update(weight_decay=0.1, learning_rate=learning_rate, **size["optim"])
  steps = size["train"]["steps"]
  config.train.update(steps=steps, eval_every=steps, eval_batches=4, checkpoint_every=steps, num_samples=0)
  return config
