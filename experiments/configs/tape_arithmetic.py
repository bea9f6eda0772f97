"""Reversed-digit addition for the TAPE study; ``--config=...:PE[,SIZE[,PROTOCOL]]``.

PE is rope | none | alibi | tape; SIZE is ``cpu`` (default: minutes on 2 cores) or
``accelerator`` (the scale of the paper's arithmetic runs, for a GPU or TPU host).
PROTOCOL is ``abacus`` (the paper's: Abacus digit embeddings on every arm, operands of
1-5 digits, as the official zhuconv/arithmetic fork of the Abacus code runs it) or
``plain`` (default: no Abacus, operands of 1-8 digits, the from-scratch baseline).
experiments/tape_arithmetic/run.py evaluates exact match at longer operands.
"""

from jaxlab.train import base_config

SIZES = {
    "cpu": dict(model=dict(d_model=64, num_layers=3, num_heads=4, mlp_dim=256),
                data=dict(batch_size=64), train=dict(steps=1400), optim=dict(learning_rate=3e-3, warmup_steps=100)),
    "accelerator": dict(model=dict(d_model=512, num_layers=8, num_heads=8, mlp_dim=2048),
                        data=dict(batch_size=256), train=dict(steps=20_000),
                        optim=dict(learning_rate=5e-4, warmup_steps=1000)),
}
PROTOCOLS = {
    "plain": dict(model=dict(), max_digits=8, steps=None),
    # Abacus indices reach max_digits + 1 + offset in training: an offset of up to 20 trains
    # the vectors that answers of up to 26 digits read at test time.
    "abacus": dict(model=dict(abacus=True, abacus_digit_tokens=(0, 9), abacus_max_offset=20,
                              abacus_max_digits=32), max_digits=5, steps=dict(cpu=5000, accelerator=20_000)),
}


def get_config(arg: str = "rope"):
  positional, size, protocol = (arg.split(",") + ["", ""])[:3]
  size, protocol = size or "cpu", protocol or "plain"
  max_digits = PROTOCOLS[protocol]["max_digits"]
  config = base_config()
  config.model.update(vocab_size=16, num_kv_heads=None, positional=positional, tape_position_size=16,
                      **SIZES[size]["model"], **PROTOCOLS[protocol]["model"])
  config.data.update(source="addition", seq_len=3 * max_digits + 4, **SIZES[size]["data"])
  config.data.addition.update(min_digits=1, max_digits=max_digits, num_train=10_000_000, num_eval=512)
  config.optim.update(weight_decay=0.1, **SIZES[size]["optim"])
  steps = (PROTOCOLS[protocol]["steps"] or {}).get(size, SIZES[size]["train"]["steps"])
  config.train.update(steps=steps, eval_every=steps, eval_batches=8, checkpoint_every=steps,
                      num_samples=0)
  return config
