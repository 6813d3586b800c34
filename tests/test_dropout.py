"""Dropout: active only in training, drawn from (seed, step), invisible at rate 0."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from helpers import train_losses, train_tiny

from flaxlm import config
from flaxlm.mesh import make_mesh
from flaxlm.model import Transformer
from flaxlm.train import Trainer, train_step

RATES = ("model.dropout_embed", "model.dropout_attn", "model.dropout_residual")


def _cfg(*overrides: str):
    return config.load(
        CONFIGS / "tiny.yaml", ["data.seq_len=16", "data.global_batch_size=2", *overrides]
    )


def _tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_is_on_only_with_a_dropout_rng_and_each_rate_acts(scan):
    tokens = _tokens()
    plain = Transformer(_cfg(f"model.scan_layers={scan}").model)
    params = plain.init(jax.random.key(0), tokens)["params"]
    reference = jax.jit(plain.apply)({"params": params}, tokens)
    for rate in RATES:
        model = Transformer(_cfg(f"model.scan_layers={scan}", f"{rate}=0.3").model)
        # Evaluation and generation (no dropout RNG): exactly the model without dropout.
        evaluated = jax.jit(model.apply)({"params": params}, tokens)
        np.testing.assert_array_equal(evaluated, reference)
        drop = jax.jit(lambda p, k, m=model: m.apply(p, tokens, rngs={"dropout": k}))
        first = drop({"params": params}, jax.random.key(1))
        assert np.abs(first - reference).max() > 1e-3, rate
        np.testing.assert_array_equal(first, drop({"params": params}, jax.random.key(1)))
        assert np.abs(first - drop({"params": params}, jax.random.key(2))).max() > 1e-3, rate


def test_rate_zero_is_the_step_without_dropout_bit_for_bit():
    cfg = _cfg()
    trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
    batch = trainer.global_batch(trainer.synthetic_batch())
    step = functools.partial(
        train_step, model=trainer.model, tx=trainer.tx, schedule=trainer.schedule
    )
    state = trainer.init_state(0)
    with trainer.context():
        without, m0 = jax.jit(step)(state, batch)
        seeded, m1 = jax.jit(functools.partial(step, dropout_seed=0))(state, batch)
    assert float(m0["loss"]) == float(m1["loss"])
    jax.tree.map(np.testing.assert_array_equal, without.params, seeded.params)

    dropped_cfg = _cfg(*(f"{r}=0.1" for r in RATES))
    dropped = Trainer(dropped_cfg, make_mesh(dropped_cfg, jax.devices()[:1]))
    _, m2 = dropped.step(dropped.init_state(0), batch)
    assert abs(float(m2["loss"]) - float(m0["loss"])) > 1e-4


@pytest.mark.slow
def test_a_resumed_run_with_dropout_matches_the_uninterrupted_one(tmp_path, corpus_cache):
    """Stopped at a checkpoint and resumed, a run with dropout (and micro-batches, each with its
    own masks) logs the uninterrupted run's losses bit for bit."""
    common = (
        "train.log_every=1", "train.eval_every=0", "train.sample_prompt=",
        "train.tensorboard=false", "checkpoint.every_steps=2", "optimizer.grad_accum_steps=2",
        *(f"{r}=0.1" for r in RATES),
    )  # fmt: skip
    train_tiny(tmp_path / "whole", corpus_cache, *common, "train.steps=4", devices=2)
    train_tiny(tmp_path / "split", corpus_cache, *common, "train.steps=2", devices=2)
    train_tiny(tmp_path / "split", corpus_cache, *common, "train.steps=4", devices=2)
    expected, got = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    assert sorted(got) == list(range(1, 5))
    assert got == expected
