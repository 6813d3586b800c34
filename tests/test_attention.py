"""Attention kernels against a plain numpy implementation of softmax(QK^T/sqrt(d))V."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.attention import attention_mask, dot_product_attention
from flaxlm.config import AttentionKernel


def numpy_attention(q, k, v, q_seg, kv_seg):
    """The formula, one (batch, head) at a time, with causal + same-segment masking."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for bi in range(b):
        for hi in range(n):
            kh = hi // (n // kv_heads)  # query head hi uses key/value head kh
            scores = q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(h)
            for ti in range(t):
                for si in range(s):
                    visible = si <= ti + (s - t) and q_seg[bi, ti] == kv_seg[bi, si] != 0
                    if not visible:
                        scores[ti, si] = -np.inf
            for ti in range(t):
                row = scores[ti]
                if np.isinf(row).all():
                    continue  # a padding query sees nothing; its output is unused
                weights = np.exp(row - row.max())
                out[bi, ti, hi] = (weights / weights.sum()) @ v[bi, :, kh]
    return out


def _inputs(n_heads=4, kv_heads=2, seed=0):
    rng = np.random.default_rng(seed)
    b, t, h = 2, 10, 8
    q = rng.standard_normal((b, t, n_heads, h))
    k = rng.standard_normal((b, t, kv_heads, h))
    v = rng.standard_normal((b, t, kv_heads, h))
    # Row 0: two documents then padding; row 1: one document.
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0], [1] * 10])
    return q, k, v, seg


@pytest.mark.parametrize("kernel", [AttentionKernel.reference, AttentionKernel.xla])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_kernels_match_numpy(kernel, heads):
    q, k, v, seg = _inputs(*heads)
    expected = numpy_attention(q, k, v, seg, seg)
    got = dot_product_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
        jnp.asarray(seg),
        jnp.asarray(seg),
        kernel,
    )
    real = seg != 0  # outputs at padding positions are unused and unconstrained
    np.testing.assert_allclose(np.asarray(got)[real], expected[real], atol=1e-5, rtol=1e-5)


def test_mask_is_causal_and_block_diagonal():
    seg = jnp.asarray([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(seg, seg))[0, 0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(mask, expected)
