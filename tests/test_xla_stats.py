"""XLA's memory and cost analysis of a compiled program, and the table of accelerator chips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from flaxlm import xla_stats
from flaxlm.flops import TPU_GENERATIONS, find_chip


def test_memory_and_cost_of_a_compiled_matmul():
    compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((64, 64), jnp.float32)).compile()
    memory = xla_stats.memory_stats(compiled)
    assert memory["arguments"] == memory["outputs"] == 64 * 64 * 4
    assert memory["live"] == memory["arguments"] + memory["outputs"] + memory["temporaries"]
    cost = xla_stats.cost_stats(compiled)
    assert cost["flops"] == pytest.approx(2 * 64**3)
    assert cost["bytes_accessed"] > 0
    assert set(cost) <= {"flops", "bytes_accessed", "optimal_seconds"}


def test_chips_by_generation_and_by_device_kind():
    assert TPU_GENERATIONS == ("v4", "v5e", "v5p", "v6e")
    # The more specific kinds win over "TPU v5", which names the v5p.
    assert find_chip("TPU v5 lite").generation == "v5e"
    assert find_chip("TPU v5").generation == "v5p"
    assert find_chip("v5p") is find_chip("TPU v5p")
    assert find_chip("NVIDIA H100 80GB HBM3").peak_flops == 989e12
    assert find_chip("TPU v2") is None
    # v4 in a topology description: two devices per chip share its peak and its HBM.
    assert find_chip("v4").per_device(2.0) == (275e12 / 2, 16)
    assert find_chip("v5e").per_device() == (197e12, 16)


# Lines as libtpu prints them in a compiled program (shapes shortened to the ones that matter).
_HLO = """
%all-reduce-scatter (input: bf16[4096,128]) -> bf16[512,128] {
  %input = bf16[4096,128]{1,0} parameter(0)
  %all-reduce.25 = bf16[4096,128]{1,0} all-reduce(%input), channel_id=127, replica_groups={{0,1,2,3,4,5,6,7}}
  ROOT %dynamic-slice.241 = bf16[512,128]{1,0} dynamic-slice(%all-reduce.25, %i, %j), dynamic_slice_sizes={512,128}
}

ENTRY %main {
  %ag = (bf16[512,128]{1,0}, bf16[4096,128]{1,0}) all-gather-start(%p), channel_id=1, dims={0}
  %agd = bf16[4096,128]{1,0} all-gather-done(%ag), channel_id=1
  %cp = (bf16[1,512,32,128]{3,1,0,2}, bf16[1,512,32,128]{3,1,0,2}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=8, source_target_pairs={{0,1},{1,0}}
  %agc = ((f32[8]{0}, f32[16]{0}), (f32[64]{0}, f32[128]{0})) all-gather-start(%a, %b), channel_id=3
  %ar = f32[1000]{0} all-reduce(%g), channel_id=2, to_apply=%add
  %rs = bf16[256]{0} reduce-scatter(%h), channel_id=4, dimensions={0}
  ROOT %fusion.11 = bf16[512,128]{1,0:T(8,128)(2,1)} fusion(%fusion.430), kind=kCustom, calls=%all-reduce-scatter, metadata={}
}
"""  # noqa: E501


def test_collective_stats_count_the_results_of_async_collectives():
    stats = xla_stats.collective_stats(_HLO)
    # The start forms deliver their results (the second half of the arrays), not the context
    # scalars of a collective-permute or only the last of a combined all-gather's results.
    assert stats["collective-permute"] == {"count": 1, "bytes": 512 * 32 * 128 * 2}
    assert stats["all-gather"] == {"count": 2, "bytes": 4096 * 128 * 2 + (64 + 128) * 4}
    assert stats["all-reduce"] == {"count": 1, "bytes": 4000}
    # A reduce-scatter written as a fusion of an all-reduce and a slice counts once, as what
    # it delivers; the all-reduce inside it is not one of the program's all-reduces.
    assert stats["reduce-scatter"] == {"count": 2, "bytes": 512 + 512 * 128 * 2}


def test_replica_groups_are_read_in_every_spelling():
    """Listed groups, iota groups (G groups of S, optionally transposed) and the empty list
    (one group of every partition)."""
    size = xla_stats._group_size
    assert size("channel_id=1, replica_groups={{0,1},{2,3}}, use_global_device_ids=true", 4) == 2
    assert size("replica_groups=[2,4]<=[8], to_apply=%add", 8) == 4
    assert size("replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add", 8) == 2
    assert size("replica_groups={}, to_apply=%add", 8) == 8
    assert size("source_target_pairs={{0,1},{1,0}}", 8) == 0
