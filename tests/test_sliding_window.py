"""Sliding-window attention: the mask, and every kernel (splash through its local mask) against
the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.attention import attention_mask, dot_product_attention
from flaxlm.config import AttentionKernel


def test_window_mask_is_causal_local_and_within_segments():
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2]])
    mask = np.asarray(attention_mask(seg, seg, window=2))[0, 0].astype(int)
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1, 1],
        ]
    )
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("kernel", [AttentionKernel.xla, AttentionKernel.splash])
def test_kernels_with_a_window_match_the_reference(kernel):
    b, t, n, kv, h, window = 1, 128, 2, 1, 16, 40
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, t, kv, h))
    v = jax.random.normal(keys[2], (b, t, kv, h))
    seg = jnp.concatenate([jnp.ones((b, 100), jnp.int32), 2 * jnp.ones((b, 28), jnp.int32)], 1)
    expected = dot_product_attention(q, k, v, seg, seg, AttentionKernel.reference, window)
    full = dot_product_attention(q, k, v, seg, seg, AttentionKernel.reference)
    assert np.abs(np.asarray(full - expected)).max() > 1e-2  # the window matters here
    got = dot_product_attention(q, k, v, seg, seg, kernel, window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=1e-5)
