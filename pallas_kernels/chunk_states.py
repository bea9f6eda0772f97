"""The inter-chunk state recurrence of the chunk-parallel GPU kernels (SSD, GLA), as a
Pallas GPU kernel (Triton lowering).

Each chunk c maps the state it is entered with to the one it leaves with by
``S ↦ a_c ⊙ S + u_c``, a_c the chunk's total decay and u_c what the chunk adds from a
zero start. The chunk kernels compute every u_c at once; this kernel passes the state
along the chunks, one program per (batch, head, block of state rows) looping over the
chunks in order, as the state-passing kernel of mamba_ssm and flash-linear-attention's
``chunk_fwd_h`` do. It reads every u_c once and writes every entering state once (an
associative scan would make log2(chunks) passes over them). The backward pass runs
the same recurrence from the last chunk to the first on the state gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float

F32 = jnp.float32
ROW_BLOCK = 16


def _kernel(decay_ref, added_ref, initial_ref, entering_ref, final_ref, *, chunks: int, reverse: bool):
  def step(i, S):
    c = chunks - 1 - i if reverse else i
    entering_ref[c] = S
    return decay_ref[pl.ds(c, 1), :] * S + added_ref[c]

  final_ref[...] = jax.lax.fori_loop(0, chunks, step, initial_ref[...])


def states_entering_chunks(
    decay: Float[Array, "b h chunks #cols"],
    added: Float[Array, "b h chunks rows cols"],
    initial: Float[Array, "b h rows cols"],
    *,
    reverse: bool = False,
    interpret: bool = False,
) -> tuple[Float[Array, "b h chunks rows cols"], Float[Array, "b h rows cols"]]:
  """(S_c for every chunk c, the state after the last chunk), with S_0 = ``initial`` and
  S_{c+1} = decay_c ⊙ S_c + added_c, ``decay`` per chunk and state column (a column of
  size 1 broadcasts over them); all fp32. ``reverse`` runs from the last chunk to the
  first: S_{C-1} = ``initial``, S_{c-1} = decay_c ⊙ S_c + added_c, and the state returned
  is the one before chunk 0 (what a backward pass needs for the gradient of the state
  leaving each chunk). Rows are a multiple of 16 and columns powers of two."""
  b, h, chunks, rows, cols = added.shape
  rb = min(ROW_BLOCK, rows)
  dc = decay.shape[-1]
  state = pl.BlockSpec((None, None, rb, cols), lambda i, j, r: (i, j, r, 0))
  per_chunk = pl.BlockSpec((None, None, chunks, rb, cols), lambda i, j, r: (i, j, 0, r, 0))
  return pl.pallas_call(
      functools.partial(_kernel, chunks=chunks, reverse=reverse), grid=(b, h, rows // rb),
      in_specs=[pl.BlockSpec((None, None, chunks, dc), lambda i, j, r: (i, j, 0, 0)), per_chunk, state],
      out_specs=[per_chunk, state],
      out_shape=[jax.ShapeDtypeStruct(added.shape, F32), jax.ShapeDtypeStruct(initial.shape, F32)],
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
      name="chunk_state_passing",
  )(decay.astype(F32), added.astype(F32), initial.astype(F32))
