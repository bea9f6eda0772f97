"""Mamba-2 state space duality (SSD): a scalar-decay, multi-head linear recurrence
computed chunkwise with matmuls. Entry point: `ops.ssd`."""
