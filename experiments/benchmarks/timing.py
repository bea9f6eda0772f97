"""Wall-clock timing and the forward + backward step shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, repeats: int = 10) -> float:
  """Median wall time of ``fn(*args)`` after two warm-up calls (compilation, autotuning)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def forward_backward(fn, *args, seed: int = 0):
  """jit of the loss ``sum(fn(*args) * cotangent)`` and its gradients in every argument, for a
  fixed random cotangent as in training. (A constant cotangent, ``sum(fn(*args))``, lets XLA
  specialize the backward pass: it made the chunked CPU scan look 2-3x slower than it is.)"""
  out = jax.eval_shape(fn, *args)
  cotangent = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32)
  argnums = tuple(range(1, len(args) + 1))
  step = jax.jit(jax.value_and_grad(lambda w, *a: jnp.sum(fn(*a).astype(jnp.float32) * w), argnums=argnums))
  return lambda *a: step(cotangent, *a)
