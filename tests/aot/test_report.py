"""What the compile report reads from XLA: ptxas's per-kernel numbers, collectives, kernels."""

from jaxlab.aot.report import collectives, pallas_kernels, ptxas_kernels

# As XLA logs ptxas -v at subprocess_compilation=3 (an ssd forward kernel for H100).
PTXAS_LOG = """I1201 23:49:25.366521   18663 subprocess_compilation.cc:349] ptxas warning : Registers are spilled to local memory in function 'ssd_fwd', 43332 bytes spill stores, 59356 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'ssd_fwd' for 'sm_90a'
ptxas info    : Function properties for ssd_fwd
    14536 bytes stack frame, 43332 bytes spill stores, 59356 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 14536 bytes cumulative stack size
ptxas info    : Compiling entry function 'input_reduce_fusion_8' for 'sm_90a'
ptxas info    : Function properties for input_reduce_fusion_8
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, 68 bytes smem, 400 bytes cmem[0]
"""

HLO = """
  %all-reduce-start.1 = f32[4]{0} all-reduce-start(f32[4]{0} %x), replica_groups={{0,1}}
  %all-reduce-done.1 = f32[4]{0} all-reduce-done(f32[4]{0} %all-reduce-start.1)
  %all-gather.3 = f32[8]{0} all-gather(f32[4]{0} %y), dimensions={0}
  %flash_attention_fwd.2 = (f32[2,4]{1,0}) custom-call(%a), custom_call_target="tpu_custom_call", metadata={op_name="jit(train_step)/shard_map/flash_attention_fwd/pallas_call" stack_frame_id=56}
  %pallas_call.28 = (f32[8]{0}) custom-call(%b), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(train_step)/cond/branch_0_fun/flash_attention_dq/pallas_call" scheduling_name="pallas_call.28"}
  %gmm.1 = f32[64,32]{1,0} custom-call(%c), custom_call_target="tpu_custom_call", metadata={op_name="jit(train_step)/shard_map/jit(gmm)/pallas_call" stack_frame_id=89}
  %ragged-all-to-all.3 = f32[64,32]{1,0} ragged-all-to-all(f32[16,32]{1,0} %d, f32[64,32]{1,0} %e, s32[4]{0} %f, s32[4]{0} %g, s32[4]{0} %h, s32[4]{0} %i), replica_groups={{0,1,2,3}}
  %custom-call.3 = s32[1024]{0} custom-call(%c), custom_call_target="AssumeGatherIndicesInBound"
"""


def test_ptxas_numbers_per_kernel():
  kernels = ptxas_kernels(PTXAS_LOG)
  assert kernels["ssd_fwd"] == {"registers": 32, "stack_frame_bytes": 14536, "spill_store_bytes": 43332,
                                "spill_load_bytes": 59356, "static_shared_memory_bytes": 0}
  assert kernels["input_reduce_fusion_8"]["static_shared_memory_bytes"] == 68
  assert kernels["input_reduce_fusion_8"]["spill_store_bytes"] == 0


def test_collectives_count_async_pairs_once_and_kernels_by_name():
  assert collectives(HLO) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 0, "all-to-all": 0,
                              "ragged-all-to-all": 1, "collective-permute": 0}
  assert pallas_kernels(HLO) == {"flash_attention_fwd": 1, "flash_attention_dq": 1, "gmm": 1}  # megablox: unnamed
