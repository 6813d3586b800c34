"""The output head computed in chunks of positions (`model.logit_chunks`): the same objective
and gradients as the whole logits at once, on one device and on sharded meshes, with less
memory; and the configurations it refuses."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flaxlm.config import ConfigError
from flaxlm.mesh import make_mesh
from flaxlm.objective import loss_sums
from flaxlm.train import Trainer


def _objective_and_grads(cfg, devices=None):
    trainer = Trainer(cfg, make_mesh(cfg, devices or jax.devices()[:1]))
    state = trainer.init_state(seed=0)
    batch = trainer.global_batch(trainer.synthetic_batch(seed=1))
    z_loss = cfg.optimizer.z_loss

    @jax.jit
    def run(params, batch):
        with trainer.context():
            return jax.grad(lambda p: loss_sums(p, trainer.model, batch, z_loss), has_aux=True)(
                params
            ), loss_sums(params, trainer.model, batch, z_loss)

    with trainer.context():
        (grads, _), (objective, aux) = run(state.params, batch)
    return objective, aux, grads


@pytest.mark.parametrize(
    "family, extra",
    [
        ("gpt2", ()),  # tied embeddings
        ("llama", ("model.final_logit_softcap=5.0",)),  # an lm_head, soft-capped logits
    ],
)
def test_chunks_give_the_objective_and_gradients_of_the_whole_logits(tiny_cfg, family, extra):
    overrides = ("optimizer.z_loss=1e-3", *extra)
    want_obj, want_aux, want_grads = _objective_and_grads(tiny_cfg(*overrides, family=family))
    got_obj, got_aux, got_grads = _objective_and_grads(
        tiny_cfg(*overrides, "model.logit_chunks=4", family=family)
    )
    np.testing.assert_allclose(got_obj, want_obj, rtol=1e-6)
    assert set(got_aux) == set(want_aux)
    for key in want_aux:
        np.testing.assert_allclose(got_aux[key], want_aux[key], rtol=1e-6, err_msg=key)
    # Summed (not averaged) gradients, added up in another order: float32 rounding of the
    # largest gradient sets the scale of the differences.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    for path, want in jax.tree_util.tree_leaves_with_path(want_grads):
        got = got_grads
        for k in path:
            got = got[k.key]
        np.testing.assert_allclose(got, want, atol=1e-6 * scale, err_msg=str(path))


@pytest.mark.parametrize(
    "mesh", [("mesh.fsdp=4", "mesh.tensor=2"), ("mesh.context=2", "mesh.fsdp=4")]
)
def test_chunks_on_a_sharded_mesh_train_like_the_whole_logits(tiny_cfg, mesh):
    """Three train steps on 8 devices, then an evaluation: the same losses with and without
    chunks."""
    overrides = (*mesh, "model.attention=reference", "data.global_batch_size=8")
    losses = {}
    for chunks in (1, 4):
        cfg = tiny_cfg(*overrides, f"model.logit_chunks={chunks}", family="llama")
        trainer = Trainer(cfg, make_mesh(cfg))
        state = trainer.init_state(seed=0)
        batch = trainer.global_batch(trainer.synthetic_batch(seed=0))
        runs = []
        for _ in range(3):
            state, metrics = trainer.step(state, batch)
            runs.append(float(metrics["loss"]))
        sums = trainer.eval_step(state.params, batch)
        losses[chunks] = [*runs, float(sums["nats"]), float(sums["tokens"])]
    np.testing.assert_allclose(losses[4], losses[1], rtol=2e-6)
    assert losses[1][2] < losses[1][0]  # it learns the batch


def test_chunks_hold_a_fraction_of_the_logits(tiny_cfg):
    """At a large vocabulary the compiled step's temporaries fall by most of the logits and
    their gradient when the loss is chunked."""
    from flaxlm import xla_stats

    def temporaries(chunks: int) -> int:
        cfg = tiny_cfg(
            "model.vocab_size=16384",
            "data.global_batch_size=2",
            "data.seq_len=512",
            "model.max_seq_len=512",
            f"model.logit_chunks={chunks}",
        )
        compiled = Trainer(cfg, make_mesh(cfg, jax.devices()[:1])).compile_step()
        return xla_stats.memory_stats(compiled)["temporaries"]

    logits = 2 * 512 * 16384 * 4  # the float32 logits of the batch (this model's dtype)
    whole, chunked = temporaries(1), temporaries(8)
    assert whole - chunked > logits, (whole, chunked)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("model.logit_chunks=0",), "must be at least 1"),
        (("model.logit_chunks=3",), "must divide data.seq_len=64"),
        (("mesh.context=4", "mesh.fsdp=2", "model.logit_chunks=32"), "split evenly"),
    ],
)
def test_bad_chunk_counts_are_refused_early(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*overrides)
