"""Gated linear attention (Yang et al. 2024): a linear-attention recurrence with a
per-key-dim forget gate, as in flash-linear-attention. Entry point: `ops.gla`."""
