"""Attention kernels behind one function, and the masks they share.

All kernels take queries (B, T, N, H), keys and values (B, S, K, H) with K dividing N
(grouped-query attention: each key/value head serves N // K query heads) and return (B, T, N, H).
Which tokens may attend to which is described by segment ids, never by a hand-built mask: token t
sees token s when s <= t (causal) and both belong to the same non-zero segment (packed documents
never see each other; segment 0 is padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxlm.config import AttentionKernel


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Boolean (B, 1, T, S) mask: causal and within one non-padding segment.

    Assumes queries are the last T of the S key positions (T == S for training).
    """
    t, s = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
    q_pos = jnp.arange(t)[:, None] + (s - t)
    k_pos = jnp.arange(s)[None, :]
    causal = k_pos <= q_pos
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = (kv_segment_ids != 0)[:, None, :]
    return (causal[None] & same & real)[:, None]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)) V written out with einsums; the oracle for the other kernels.

    Logits and softmax are computed in float32 whatever the input dtype.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(h))
    # mask: (B, 1, T, S) -> broadcast over (K, G).
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v)
    return out.reshape(b, t, n, h)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    kernel: AttentionKernel = AttentionKernel.xla,
) -> jax.Array:
    """Masked multi-head attention with the selected kernel."""
    mask = attention_mask(q_segment_ids, kv_segment_ids)
    if kernel == AttentionKernel.reference:
        return reference_attention(q, k, v, mask)
    if kernel in (AttentionKernel.xla, AttentionKernel.cudnn):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=kernel.value)
    raise ValueError(f"unknown attention kernel {kernel!r}")
