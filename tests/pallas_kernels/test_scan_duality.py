"""Mamba-1's selective scan and Mamba-2's SSD are the same recurrence when A is one scalar
per head (Dao & Gu 2024, §3; mamba_ssm's ``ssd_selective_scan``): channels ``(h p)``,
Δ and A repeated over a head's channels and A over the state."""

import chex
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.ssd.ops import ssd


@pytest.mark.parametrize("implementation", ["sequential", "xla"])
def test_selective_scan_equals_ssd_with_scalar_A_per_head(implementation):
  b, t, h, p, g, n = 2, 37, 4, 8, 2, 16
  keys = jax.random.split(jax.random.key(11), 7)
  x = jax.random.normal(keys[0], (b, t, h, p))
  dt = jax.nn.softplus(jax.random.normal(keys[1], (b, t, h)))
  A = -jnp.exp(jax.random.normal(keys[2], (h,)))
  B, C = (jax.random.normal(k, (b, t, g, n)) for k in keys[3:5])
  D = jax.random.normal(keys[5], (h,))
  s0 = jax.random.normal(keys[6], (b, h, p, n))

  y_ssd, s_ssd = ssd(x, dt, A, B, C, chunk_size=16, D=D, initial_state=s0, return_final_state=True,
                     implementation=implementation)
  y_sel, s_sel = selective_scan(
      x.reshape(b, t, h * p), jnp.repeat(dt, p, axis=2), jnp.repeat(A, p)[:, None] * jnp.ones((1, n)),
      B, C, D=jnp.repeat(D, p), initial_state=s0.reshape(b, h * p, n), return_final_state=True,
      implementation=implementation, chunk_size=16)
  chex.assert_trees_all_close(y_sel.reshape(b, t, h, p), y_ssd, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(s_sel.reshape(b, h, p, n), s_ssd, atol=1e-4, rtol=1e-4)
