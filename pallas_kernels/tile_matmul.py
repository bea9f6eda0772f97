"""The matmul inside the chunked kernels, with the operand precision as a policy.

On TPU the kernels multiply fp32 tiles at full precision (no bf16 passes). On the GPU
(Triton) an fp32 matmul at full precision runs without tensor cores and spills
registers at the tiles of a chunk, so there the operands are in the inputs' dtype, as
mamba_ssm's and flash-linear-attention's kernels do (bf16 tensor-core MMAs for a bf16
model, fp32 intermediates rounded to bf16), and fp32 inputs take three TF32 passes
(about fp32 accuracy); interpreted on the CPU, which has no TF32, fp32 stays exact.
Accumulation is fp32 throughout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TileMatmul:
  """``mm(a, b, contract)``: a 2-d matmul contracting a's axis ``contract[0]`` with b's
  ``contract[1]``, both operands cast to ``dtype``, fp32 accumulation."""

  dtype: jnp.dtype = jnp.dtype(F32)
  precision: jax.lax.Precision | jax.lax.DotAlgorithmPreset | None = jax.lax.Precision.HIGHEST

  @classmethod
  def for_gpu(cls, input_dtype, interpret: bool) -> TileMatmul:
    dtype = jnp.dtype(input_dtype)
    if dtype != F32:
      return cls(dtype, None)
    return cls(dtype, jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3)

  def __call__(self, a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a.astype(self.dtype), b.astype(self.dtype), dims, precision=self.precision,
                               preferred_element_type=F32)
