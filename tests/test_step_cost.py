"""The cost of a whole step with loops counted by their trip counts (flaxlm/step_cost.py).

The oracle is XLA's own cost analysis of the same step compiled without loops (unrolled
layers, one pass over the whole batch), which counts every operation."""

from __future__ import annotations

import jax
import pytest

from flaxlm import xla_stats
from flaxlm.mesh import make_mesh
from flaxlm.step_cost import has_loops, layer_pattern, step_cost
from flaxlm.train import Trainer

SMALL = ("data.seq_len=32", "model.max_seq_len=32", "data.global_batch_size=8")
MOE = ("model.moe.num_experts=4", "model.moe.every=2", "model.moe.first_dense_layers=1")
WINDOW = ("model.sliding_window=8", "model.global_every=3")


def _mesh(cfg):
    return make_mesh(cfg, jax.devices()[:1])


def _compiled_cost(cfg) -> dict[str, float]:
    return xla_stats.cost_stats(Trainer(cfg, _mesh(cfg)).compile_step())


@pytest.mark.parametrize(
    "shape, loops",
    [
        (("model.n_layers=6",), ("model.scan_layers=true",)),
        (("model.n_layers=6",), ("model.scan_layers=true", "optimizer.grad_accum_steps=4")),
        (("model.n_layers=7", *MOE), ("optimizer.grad_accum_steps=2",)),
        (("model.n_layers=9", *WINDOW), ("optimizer.grad_accum_steps=2",)),
    ],
    ids=["scanned", "scanned+accumulation", "moe-pattern", "local-global-pattern"],
)
def test_a_looping_step_costs_what_the_same_step_without_loops_costs(tiny_cfg, shape, loops):
    looping, flat = tiny_cfg(*SMALL, *shape, *loops), tiny_cfg(*SMALL, *shape)
    assert has_loops(looping) and not has_loops(flat)
    want = _compiled_cost(flat)
    # XLA alone counts one loop body: far less than the step.
    assert _compiled_cost(looping)["flops"] < 0.6 * want["flops"]
    got, how = step_cost(looping, _mesh(looping))
    assert "extrapolated" in how
    for key in ("flops", "bytes_accessed"):
        assert got[key] == pytest.approx(want[key], rel=0.01), key


def test_the_layer_pattern_is_the_dense_prefix_and_the_period(tiny_cfg):
    assert layer_pattern(tiny_cfg()) == (0, 1)
    assert layer_pattern(tiny_cfg(*MOE)) == (1, 2)
    assert layer_pattern(tiny_cfg(*WINDOW)) == (0, 3)
    assert layer_pattern(tiny_cfg(*MOE, *WINDOW)) == (1, 6)


def test_a_chunked_loss_costs_the_whole_head_and_its_recomputation(tiny_cfg):
    """With model.logit_chunks the loss loops over chunks of positions (rematerialised): the
    step costs the unchunked step plus one more forward projection onto the vocabulary."""
    vocab = ("model.vocab_size=4096", "model.n_layers=2")
    chunked, whole = tiny_cfg(*SMALL, *vocab, "model.logit_chunks=4"), tiny_cfg(*SMALL, *vocab)
    assert has_loops(chunked)
    got, _ = step_cost(chunked, _mesh(chunked))
    m = chunked.model
    tokens = chunked.data.global_batch_size * chunked.data.seq_len
    recompute = 2 * tokens * m.d_model * m.vocab_size
    # XLA alone counts one chunk of the loss: its head's FLOPs mostly missing.
    assert _compiled_cost(chunked)["flops"] < got["flops"] - recompute
    want = _compiled_cost(whole)["flops"] + recompute
    assert got["flops"] == pytest.approx(want, rel=0.01)
