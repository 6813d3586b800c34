"""Speed options that must not change the function (issue 9): the residual-gradient barrier."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from test_train import _fixed_batch

from flaxlm.model import Transformer, residual_grad_barrier
from flaxlm.train import loss_sums


def test_residual_grad_barrier_is_the_identity_with_the_identity_gradient():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.float32)
    f = lambda x: (jnp.sin(residual_grad_barrier(x)) ** 2).sum()  # noqa: E731
    g = lambda x: (jnp.sin(x) ** 2).sum()  # noqa: E731
    assert jnp.array_equal(residual_grad_barrier(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(f))(x), jax.jit(jax.grad(g))(x))
    # A NaN gradient passes through unchanged too (the conditional's other branch).
    nan = jnp.full_like(x, jnp.nan)
    assert jnp.isnan(jax.jit(jax.grad(lambda x: (residual_grad_barrier(x) * nan).sum()))(x)).all()


def test_residual_grad_barrier_keeps_loss_and_gradients(tiny_cfg):
    """The unrolled stack with the barrier computes the same loss and gradients as without."""
    cfg_on = tiny_cfg("model.n_layers=4")
    cfg_off = tiny_cfg("model.n_layers=4", "model.residual_grad_barrier=false")
    assert cfg_on.model.residual_grad_barrier and not cfg_off.model.residual_grad_barrier
    params = nn.meta.unbox(
        Transformer(cfg_on.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    batch = {k: jnp.asarray(v) for k, v in _fixed_batch(cfg_on).items()}

    def loss_and_grads(cfg):
        model = Transformer(cfg.model)
        fn = jax.jit(jax.value_and_grad(lambda p: loss_sums(p, model, batch, 0.0)[0]))
        return fn(params)

    (loss_on, grads_on), (loss_off, grads_off) = loss_and_grads(cfg_on), loss_and_grads(cfg_off)
    np.testing.assert_allclose(float(loss_on), float(loss_off), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_on, grads_off
    )


def test_benchmark_config_is_the_issue_9_model():
    """configs/bench/gpt2-23m.yaml: the model that benchmarks/vs_pytorch.py compares."""
    from conftest import CONFIGS

    from flaxlm import config
    from flaxlm.flops import analytic_param_count, flops_per_token

    cfg = config.load(CONFIGS / "bench" / "gpt2-23m.yaml")
    m = cfg.model
    assert (m.n_layers, m.n_heads, m.d_model, m.d_ff, m.vocab_size) == (6, 8, 512, 2048, 8192)
    assert (cfg.data.seq_len, cfg.data.global_batch_size) == (256, 8)
    assert cfg.optimizer.grad_clip_norm == 0 and cfg.optimizer.weight_decay == 0.1
    # By hand: embeddings 8192*512 + positions 256*512; per layer 4 attention matrices with
    # biases, the MLP with biases, two LayerNorms; the final LayerNorm.
    per_layer = 4 * (512 * 512 + 512) + (512 * 2048 + 2048) + (2048 * 512 + 512) + 2 * 2 * 512
    expected = 8192 * 512 + 256 * 512 + 6 * per_layer + 2 * 512
    assert expected == 23_240_704 == analytic_param_count(m)
    assert flops_per_token(m, expected, 256) == 6 * expected + 12 * 6 * 256 * 512
