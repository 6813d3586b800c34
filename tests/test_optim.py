"""The learning-rate schedule and what weight decay touches."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.config import OptimizerConfig
from flaxlm.optim import learning_rate_schedule, make_optimizer


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # halfway down the cosine
    assert float(lr(110)) == pytest.approx(0.1)
    values = [float(lr(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_weight_decay_skips_biases_and_norm_scales():
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, decay="constant")
    tx = make_optimizer(cfg, total_steps=10)
    # Per-head biases are 2-D and scanned layers stack everything: rank decides nothing.
    params = {
        "query": {"kernel": jnp.ones((2, 2, 2)), "bias": jnp.ones((2, 2))},
        "norm": {"scale": jnp.ones((3, 2))},
        "embed": {"embedding": jnp.ones((4, 2))},
    }
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients only decay moves a parameter: -lr * wd * p = -0.05 on matrices.
    np.testing.assert_allclose(updates["query"]["kernel"], -0.05 * np.ones((2, 2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["embed"]["embedding"], -0.05 * np.ones((4, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["query"]["bias"], np.zeros((2, 2)))
    np.testing.assert_allclose(updates["norm"]["scale"], np.zeros((3, 2)))


def test_linear_and_warmup_stable_decay_schedules():
    linear = learning_rate_schedule(
        OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay="linear", min_lr_ratio=0.0), 110
    )
    assert float(linear(60)) == pytest.approx(0.5)
    assert float(linear(110)) == pytest.approx(0.0, abs=1e-7)
    wsd = learning_rate_schedule(
        OptimizerConfig(
            learning_rate=1.0, warmup_steps=10, decay="wsd", decay_fraction=0.2, min_lr_ratio=0.1
        ),
        100,
    )
    # Warmup to step 10, the peak until step 80, then a straight line to 0.1 at step 100.
    assert float(wsd(5)) == pytest.approx(0.5)
    assert float(wsd(10)) == float(wsd(50)) == float(wsd(80)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(0.55)
    assert float(wsd(100)) == pytest.approx(0.1)
