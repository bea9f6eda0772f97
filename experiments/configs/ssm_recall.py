"""Multi-query associative recall (Zoology's MQAR) for the SSM recall study
(experiments/ssm_recall): ``--config=experiments/configs/ssm_recall.py:MODEL,DEPTH[,SIZE]``.

MODEL is one of attention, mamba, mamba_both, mamba_one, mamba_zero (Mamba without and
with polarization), mamba2, gla; DEPTH the number of layers; SIZE ``cpu`` (the study
as run on 2 CPU cores: trained on length 64 with 8 pairs, tested up to length 256 with
64 pairs) or ``accelerator`` (the paper's scale: vocabulary 8192, length 1024, 256
pairs, d_model 128). As in Zoology and SSM-Bottleneck the blocks have no MLP.
"""

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
SIZES = {
    "cpu": dict(model=dict(d_model=64, vocab_size=512), data=dict(seq_len=64, batch_size=16),
                mqar=dict(num_kv_pairs=8), train=dict(steps=1200),
                optim=dict(learning_rate=3e-3, warmup_steps=100)),
    "accelerator": dict(model=dict(d_model=128, vocab_size=8192), data=dict(seq_len=1024, batch_size=64),
                        mqar=dict(num_kv_pairs=256), train=dict(steps=20_000),
                        optim=dict(learning_rate=1e-3, warmup_steps=1000)),
}


def get_config(arg: str = "mamba,2"):
  model, depth, *size = arg.split(",")
  size = SIZES[size[0] if size else "cpu"]
  config = base_config()
  config.model.update(ffns=("none",), num_layers=int(depth), ssm_chunk=64, **MODELS[model], **size["model"])
  config.data.update(source="mqar", **size["data"])
  config.data.mqar.update(vocab_size=size["model"]["vocab_size"], num_train=10_000_000, num_eval=512,
                          random_non_queries=False, **size["mqar"])
  config.optim.update(weight_decay=0.1, **size["optim"])
  steps = size["train"]["steps"]
  config.train.update(steps=steps, eval_every=steps, eval_batches=4, checkpoint_every=steps, num_samples=0)
  return config
