"""A compiled program read from its HLO: loops by their trip counts (hlo_program, hlo_cost).

The oracles are XLA's own cost analysis of the same computation compiled without loops, which
counts every operation, and a program in the forms libtpu writes (a windowed einsum's loop)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from flaxlm import hlo_cost, xla_stats
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer

# Any positive roofline: the CPU has no published peak.
PEAK, BANDWIDTH = 1e12, 1e11


def _layers(x, w, unroll: bool):
    """tanh(x @ w[i]) for each of the stacked weights, a scan or the same scan unrolled."""

    def layer(h, wi):
        return jnp.tanh(h @ wi), None

    return jax.lax.scan(layer, x, w, unroll=unroll)[0]


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_a_scan_costs_its_trip_count_times_its_body():
    x, w = jnp.ones((64, 128)), jnp.ones((6, 128, 128))
    looped = _compiled(lambda x, w: _layers(x, w, unroll=False), x, w)
    flat = _compiled(lambda x, w: _layers(x, w, unroll=True), x, w)
    want = xla_stats.cost_stats(flat)["flops"]
    assert want >= 6 * 2 * 64 * 128 * 128
    # XLA counts the loop's body once.
    assert xla_stats.cost_stats(looped)["flops"] < want / 3
    got = hlo_cost.program_cost(looped.as_text())
    assert got["loops"] == 1 and got["unknown_loops"] == 0
    assert got["flops"] == 6 * 2 * 64 * 128 * 128
    assert got["missed_flops"] == 5 * 2 * 64 * 128 * 128
    assert hlo_cost.program_cost(flat.as_text())["flops"] == got["flops"]


def test_nested_loops_multiply_their_trip_counts():
    def twice(x, w):  # an outer loop of 3 over an inner scan of 4
        return jax.lax.fori_loop(0, 3, lambda _, h: _layers(h, w, unroll=False), x)

    x, w = jnp.ones((32, 64)), jnp.ones((4, 64, 64))
    got = hlo_cost.program_cost(_compiled(twice, x, w).as_text())
    assert got["loops"] == 2 and got["unknown_loops"] == 0
    assert got["flops"] == 3 * 4 * 2 * 32 * 64 * 64


def test_a_loop_whose_trip_count_depends_on_data_is_counted_once_and_reported():
    def until_small(x, w):
        return jax.lax.while_loop(lambda h: h.sum() > 1.0, lambda h: jnp.tanh(h @ w) * 0.5, x)

    x, w = jnp.ones((32, 64)), jnp.ones((64, 64))
    got = hlo_cost.program_cost(_compiled(until_small, x, w).as_text())
    assert got["unknown_loops"] == 1
    assert got["flops"] == 2 * 32 * 64 * 64 and got["missed_flops"] == 0


@pytest.mark.parametrize(
    "padding, dilation",
    [("VALID", (1, 1)), ("SAME", (1, 1)), (((3, 1), (0, 2)), (1, 1)), ("SAME", (2, 1))],
    ids=["valid", "same", "uneven-padding", "dilated"],
)
def test_matmul_flops_of_dots_and_convolutions_are_xla_s(padding, dilation):
    """Convolutions count multiply-adds only where the window lies over the input, as XLA
    does (libtpu writes batched matmuls as padded convolutions)."""

    def both(x, k, a, b):
        conv = jax.lax.conv_general_dilated(x, k, (1, 1), padding, rhs_dilation=dilation)
        return conv.sum() + jnp.einsum("bij,bjk->bik", a, b).sum()

    args = (jnp.ones((2, 3, 9, 7)), jnp.ones((5, 3, 4, 3)))
    args += (jnp.ones((4, 8, 16)), jnp.ones((4, 16, 32)))
    compiled = _compiled(both, *args)
    got = hlo_cost.program_cost(compiled.as_text())["flops"]
    elementwise = 2 * 9 * 7 * 5 * 2 + 4 * 8 * 32  # at most: the sums' adds
    assert xla_stats.cost_stats(compiled)["flops"] - elementwise <= got
    assert got <= xla_stats.cost_stats(compiled)["flops"]


# A windowed einsum as libtpu writes it: the counter is copied between memory spaces, the
# body computes two shards per iteration, and the shards arrive by collective permutes.
_WINDOWED = """
%body (p: (bf16[64,32], bf16[64,128], u32[])) -> (bf16[64,32], bf16[64,128], u32[]) {
  %constant.2 = u32[]{:T(128)} constant(2)
  %p = (bf16[64,32]{1,0}, bf16[64,128]{1,0}, u32[]{:T(128)}) parameter(0)
  %gte.0 = bf16[64,32]{1,0} get-tuple-element(%p), index=0
  %gte.1 = bf16[64,128]{1,0} get-tuple-element(%p), index=1
  %gte.2 = u32[]{:T(128)} get-tuple-element(%p), index=2
  %cp = (bf16[64,32]{1,0}, bf16[64,32]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%gte.0), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[64,32]{1,0} collective-permute-done(%cp)
  %w = bf16[32,128]{1,0} parameter(1)
  %fusion.1 = bf16[64,128]{1,0} fusion(%gte.0, %w, %gte.1), kind=kOutput, calls=%fused_dot
  %copy.9 = u32[]{:T(128)S(6)} copy(%gte.2)
  %add.3 = u32[]{:T(128)} add(%copy.9, %constant.2)
  ROOT %tuple.4 = (bf16[64,32]{1,0}, bf16[64,128]{1,0}, u32[]{:T(128)}) tuple(%cpd, %fusion.1, %add.3)
}

%fused_dot (a: bf16[64,32], b: bf16[32,128], c: bf16[64,128]) -> bf16[64,128] {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,128]{1,0} parameter(1)
  %c = bf16[64,128]{1,0} parameter(2)
  %convolution.7 = bf16[64,128]{1,0} convolution(%a, %b), dim_labels=bf_io->bf
  ROOT %add.8 = bf16[64,128]{1,0} add(%convolution.7, %c)
}

%cond (q: (bf16[64,32], bf16[64,128], u32[])) -> pred[] {
  %constant.5 = u32[]{:T(128)} constant(8)
  %q = (bf16[64,32]{1,0}, bf16[64,128]{1,0}, u32[]{:T(128)}) parameter(0)
  %gte.6 = u32[]{:T(128)} get-tuple-element(%q), index=2
  ROOT %compare.7 = pred[]{:T(512)} compare(%gte.6, %constant.5), direction=LT
}

ENTRY %main (x: bf16[64,32], y: bf16[64,128]) -> bf16[64,128] {
  %x = bf16[64,32]{1,0} parameter(0)
  %y = bf16[64,128]{1,0} parameter(1)
  %constant.0 = u32[]{:T(128)} constant(0)
  %copy.1 = u32[]{:T(128)} copy(%constant.0)
  %tuple.2 = (bf16[64,32]{1,0}, bf16[64,128]{1,0}, u32[]{:T(128)}) tuple(%x, %y, %copy.1)
  %while.3 = (bf16[64,32]{1,0}, bf16[64,128]{1,0}, u32[]{:T(128)}) while(%tuple.2), condition=%cond, body=%body, metadata={op_name="jit(f)/dot_general"}
  ROOT %out = bf16[64,128]{1,0} get-tuple-element(%while.3), index=1
}
"""  # noqa: E501


def test_a_windowed_einsum_loop_as_libtpu_writes_it():
    got = hlo_cost.program_cost(_WINDOWED, PEAK, BANDWIDTH)
    assert got["loops"] == 1 and got["unknown_loops"] == 0
    # 0, 2, 4, 6: four iterations of a 64x32x128 matmul, three of them missed by XLA.
    assert got["flops"] == 4 * 2 * 64 * 32 * 128
    assert got["missed_flops"] == 3 * 2 * 64 * 32 * 128
    # The fusion reads its three operands and writes its result; the permute reads the shard
    # it sends and writes the one it receives (and a few bytes of scalars).
    fusion = 2 * (64 * 32 + 32 * 128 + 2 * 64 * 128)
    permute = 2 * 2 * 64 * 32
    assert got["missed_bytes_accessed"] == pytest.approx(3 * (fusion + permute), abs=3 * 40)
    # Each priced at its roofline: the fusion by its FLOPs, the permute by its bytes.
    fusion_seconds = max(2 * 64 * 32 * 128 / PEAK, fusion / BANDWIDTH)
    want = 3 * (fusion_seconds + permute / BANDWIDTH)
    assert got["missed_seconds"] == pytest.approx(want, rel=0.01)
    stats = xla_stats.collective_stats(_WINDOWED)
    assert stats["collective-permute"] == {"count": 4, "bytes": 4 * 2 * 64 * 32}


def test_a_scanned_model_has_the_matmuls_of_the_unrolled_model(tiny_cfg):
    """The planner's invariant: read with loops by their trip counts, the program of a
    scanned model and that of the same model unrolled do the same matmuls. (Their bytes
    differ by what the scan itself moves: on the CPU, the layers' residuals written into
    stacked arrays and read back, and copies of the carry.)"""
    costs = []
    for scan in ("true", "false"):
        cfg = tiny_cfg("model.n_layers=4", f"model.scan_layers={scan}", "data.seq_len=32")
        compiled = Trainer(cfg, make_mesh(cfg, jax.devices()[:1])).compile_step()
        costs.append(hlo_cost.program_cost(compiled.as_text(), PEAK, BANDWIDTH))
    scanned, unrolled = costs
    assert scanned["unknown_loops"] == 0 and scanned["missed_flops"] > 0
    assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.001)
    assert unrolled["missed_flops"] == 0


# libtpu's async collective fusions: one all-gather (channel 9) whose steps are spread over a
# loop's body and the code after it, and one (channel 10) that each iteration runs whole.
_PIPELINED = """
%async_collective_fusion.1 (a: bf16[16,32], b: bf16[16,32]) -> (bf16[64,32], bf16[64,32]) {
  %a = bf16[16,32]{1,0} parameter(0)
  %b = bf16[16,32]{1,0} parameter(1)
  %all-gather.5 = bf16[64,32]{1,0} all-gather(%a), channel_id=9, dimensions={0}
  %all-gather.6 = bf16[64,32]{1,0} all-gather(%b), channel_id=10, dimensions={0}
  ROOT %tuple.7 = (bf16[64,32]{1,0}, bf16[64,32]{1,0}) tuple(%all-gather.5, %all-gather.6)
}

%async_collective_fusion.2 (c: bf16[16,32]) -> bf16[64,32] {
  %c = bf16[16,32]{1,0} parameter(0)
  ROOT %all-gather.8 = bf16[64,32]{1,0} all-gather(%c), channel_id=9, dimensions={0}
}

%body (p: (bf16[16,32], s32[])) -> (bf16[16,32], s32[]) {
  %p = (bf16[16,32]{1,0}, s32[]) parameter(0)
  %x = bf16[16,32]{1,0} get-tuple-element(%p), index=0
  %i = s32[] get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %fusion.1 = (bf16[64,32]{1,0}, bf16[64,32]{1,0}) fusion(%x, %x), kind=kCustom, calls=%async_collective_fusion.1
  %next = s32[] add(%i, %one)
  ROOT %t = (bf16[16,32]{1,0}, s32[]) tuple(%x, %next)
}

%cond (q: (bf16[16,32], s32[])) -> pred[] {
  %q = (bf16[16,32]{1,0}, s32[]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=1
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(%j, %four), direction=LT
}

ENTRY %main (y: bf16[16,32]) -> bf16[64,32] {
  %y = bf16[16,32]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (bf16[16,32]{1,0}, s32[]) tuple(%y, %zero)
  %loop = (bf16[16,32]{1,0}, s32[]) while(%init), condition=%cond, body=%body
  ROOT %fusion.2 = bf16[64,32]{1,0} fusion(%y), kind=kCustom, calls=%async_collective_fusion.2
}
"""  # noqa: E501


def test_a_collective_spread_over_a_loop_counts_once_and_one_in_each_iteration_every_time():
    stats = xla_stats.collective_stats(_PIPELINED)
    assert stats["all-gather"] == {"count": 1 + 4, "bytes": (1 + 4) * 64 * 32 * 2}
