"""Passkey retrieval for the TAPE study; ``--config=...:PE[,SIZE[,ARM]]`` as tape_arithmetic.

Without ARM: a model trained from scratch on contexts of 24-64 tokens (the pretraining
run, or an arm of the zero-shot baseline). With ARM, the paper's passkey protocol: a
fine-tune of that pretrained RoPE model (``init.start_from``, set by the study) to twice
its context with linear position interpolation (Chen et al. 2023), training what the
arm names: (a) ``rope_full`` everything, (b) ``rope_embed_norm`` embeddings and norms,
(c) ``tape_pe`` TAPE converted from the RoPE model, its parameters with embeddings and
norms (the paper's PEFT), (d) ``tape_full`` TAPE, everything, (e) ``lora`` rank-8 LoRA
on W_q, W_k, W_v, W_o with embeddings and norms (the paper's LoRA baseline).
experiments/tape_arithmetic/run.py scores retrieval at 32-512 tokens.
"""

from jaxlab.train import base_config

SIZES = {
    "cpu": dict(model=dict(d_model=64, num_layers=3, num_heads=4, mlp_dim=256),
                data=dict(batch_size=32), train=dict(steps=600), optim=dict(learning_rate=2e-3, warmup_steps=100),
                fine_tune=dict(steps=300, learning_rate=5e-4, warmup_steps=20)),
    "accelerator": dict(model=dict(d_model=512, num_layers=8, num_heads=8, mlp_dim=2048),
                        data=dict(batch_size=128), train=dict(steps=10_000),
                        optim=dict(learning_rate=5e-4, warmup_steps=1000),
                        fine_tune=dict(steps=1000, learning_rate=1e-4, warmup_steps=50)),
}
EMBED_NORM = r"^embed/|norm/"  # train_llama.py also trains every parameter named embed or norm
FINE_TUNING = {
    "rope_full": dict(model=dict(), trainable=None),
    "rope_embed_norm": dict(model=dict(), trainable=EMBED_NORM),
    "tape_pe": dict(model=dict(positional="tape"), trainable="tape|" + EMBED_NORM),
    "tape_full": dict(model=dict(positional="tape"), trainable=None),
    "lora": dict(model=dict(lora_rank=8, lora_alpha=16.0, lora_targets=r"mixer/(q|k|v|o)$"),
                 trainable=r"/lora/(a|b)$|" + EMBED_NORM),
}
PRETRAINED_LEN, INTERPOLATION = 64, 2.0


def get_config(arg: str = "rope"):
  positional, size, arm = (arg.split(",") + ["", ""])[:3]
  size = size or "cpu"
  config = base_config()
  config.model.update(vocab_size=32, num_kv_heads=None, positional=positional, tape_position_size=16,
                      **SIZES[size]["model"])
  config.data.update(source="passkey", seq_len=PRETRAINED_LEN, **SIZES[size]["data"])
  config.data.passkey.update(min_len=24, max_len=PRETRAINED_LEN, digits=5, num_train=10_000_000, num_eval=256)
  config.optim.update(**SIZES[size]["optim"])
  steps = SIZES[size]["train"]["steps"]
  if arm:
    if positional != "rope":
      raise ValueError(f"the passkey fine-tunes start from a RoPE model; got {arg!r}")
    window = int(PRETRAINED_LEN * INTERPOLATION)
    tune = SIZES[size]["fine_tune"]
    config.model.update(rope_scaling="linear", rope_scaling_factor=INTERPOLATION, **FINE_TUNING[arm]["model"])
    config.data.update(seq_len=window)
    config.data.passkey.update(max_len=window)
    config.optim.update(learning_rate=tune["learning_rate"], warmup_steps=tune["warmup_steps"],
                        trainable=FINE_TUNING[arm]["trainable"])
    steps = tune["steps"]
  config.train.update(steps=steps, eval_every=steps, eval_batches=4, checkpoint_every=steps,
                      num_samples=0)
  return config
