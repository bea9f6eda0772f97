"""Flash attention: online-softmax attention with GQA, causal, sliding-window and
segment masks, and logit soft-capping. Entry point: `ops.flash_attention`."""
