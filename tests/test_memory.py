"""The memory model against XLA's memory analysis of the compiled step (8 CPU devices)."""

from __future__ import annotations

import jax
import pytest

from flaxlm import memory
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer


def _compiled_and_estimate(cfg):
    trainer = Trainer(cfg, make_mesh(cfg))
    compiled = trainer.compile_step()
    estimate = memory.estimate(cfg, trainer.abstract_state, dict(trainer.mesh.shape))
    return compiled.memory_analysis(), estimate


@pytest.mark.parametrize("mesh", [["mesh.fsdp=8"], ["mesh.data=8", "mesh.fsdp=1"]])
def test_state_estimate_is_the_compiled_argument_size(tiny_cfg, mesh):
    cfg = tiny_cfg(*mesh, "data.global_batch_size=16")
    analysis, estimate = _compiled_and_estimate(cfg)
    # Arguments are the state's shards plus this device's rows of the three int32 batch arrays.
    local_rows = cfg.data.global_batch_size // 8
    batch_bytes = 3 * local_rows * cfg.data.seq_len * 4
    state = analysis.argument_size_in_bytes - batch_bytes
    assert state == pytest.approx(estimate.params + estimate.optimizer, rel=0.01, abs=64)
    # The donated state comes back in the same buffers.
    assert analysis.alias_size_in_bytes == pytest.approx(state, rel=0.01, abs=64)


def test_fsdp_divides_the_state_and_remat_shrinks_activations(tiny_cfg):
    _, dp = _compiled_and_estimate(tiny_cfg("mesh.data=8", "mesh.fsdp=1"))
    _, fsdp = _compiled_and_estimate(tiny_cfg("mesh.fsdp=8"))
    # All but the small replicated vectors (biases, norm scales) are split 8 ways.
    assert fsdp.params == pytest.approx(dp.params / 8, rel=0.1)
    deep = ("model.n_layers=8", "data.global_batch_size=32", "model.scan_layers=true")
    none_analysis, none = _compiled_and_estimate(tiny_cfg(*deep, "model.remat=none"))
    full_analysis, full = _compiled_and_estimate(tiny_cfg(*deep, "model.remat=full"))
    assert full.activations < none.activations
    assert full_analysis.temp_size_in_bytes < none_analysis.temp_size_in_bytes
    assert jax.device_count() == 8
