"""The program XLA is handed: activation constraints, kernels and loop costs, read from the
lowered or compiled train step (8 CPU devices, or TPU topologies through libtpu)."""

from __future__ import annotations

import re

import pytest

from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer

BATCH_SHARDED = re.compile(r'sharding_constraint %\S+ <@mesh, \[\{"data", "fsdp"\}')


def _constraints(trainer: Trainer) -> list[str]:
    text = trainer.lower_step().as_text()
    return [line for line in text.splitlines() if "sharding_constraint" in line]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_constraints_reach_the_lowered_step(tiny_cfg, family):
    cfg = tiny_cfg("mesh.fsdp=4", "mesh.tensor=2", family=family)
    constraints = _constraints(Trainer(cfg, make_mesh(cfg)))
    layers = cfg.model.n_layers
    # Per block: its output, q, k, v, the attention output and the MLP hidden; then the
    # embeddings and the logits. Each is constrained in the forward pass and its gradient in
    # the backward pass.
    batch_sharded = [c for c in constraints if BATCH_SHARDED.search(c)]
    assert len(batch_sharded) >= 2 * (6 * layers + 2), constraints
    heads_on_tensor = [c for c in batch_sharded if re.search(r'\{\}, \{"tensor"\}, \{\}\]', c)]
    assert len(heads_on_tensor) >= 2 * 4 * layers


def test_micro_batches_keep_their_rows_on_every_device(tiny_cfg):
    cfg = tiny_cfg("mesh.fsdp=8", "data.global_batch_size=16", "optimizer.grad_accum_steps=2")
    constraints = _constraints(Trainer(cfg, make_mesh(cfg)))
    # (micro-batches, rows, length): the rows of each micro-batch split over data x fsdp.
    assert any('[{}, {"data", "fsdp"}, {}]' in c for c in constraints)


# TPU layouts pad small dimensions to tiles of 128: keep the model's dimensions multiples of it.
TILED = ("model.d_model=256", "model.d_ff=512", "model.n_heads=2", "model.dtype=bfloat16")


def _tpu_trainer(tiny_cfg, topology: str, *overrides: str, family: str = "llama") -> Trainer:
    pytest.importorskip("libtpu")
    from flaxlm import aot

    cfg = tiny_cfg(*TILED, *overrides, family=family)
    return Trainer(cfg, make_mesh(cfg, aot.topology_devices(topology)))


def test_splash_for_a_tpu_topology_is_the_mosaic_kernel(tiny_cfg):
    trainer = _tpu_trainer(
        tiny_cfg, "v5e:2x2", "model.attention=splash", "data.seq_len=128", "model.max_seq_len=128"
    )
    text = trainer.lower_step().as_text()
    # The TPU kernel, not the Pallas interpreter (a loop over the kernel's grid) that this
    # CPU process would run.
    assert "tpu_custom_call" in text
    assert "stablehlo.while" not in text
