"""Attention kernels behind one function, and the masks they share.

All kernels take queries (B, T, N, H), keys and values (B, S, K, H) with K dividing N
(grouped-query attention: each key/value head serves N // K query heads) and return (B, T, N, H).
Which tokens may attend to which is described by segment ids, never by a hand-built mask: token t
sees token s when s <= t (causal) and both belong to the same non-zero segment (packed documents
never see each other; segment 0 is padding).
"""

from __future__ import annotations

import math

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


def _splash_block_sizes(t: int, s: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    # The largest block up to 512 that divides the length (a multiple of 128, as validated).
    bq, bkv = math.gcd(t, 512), math.gcd(s, 512)
    return sk.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )  # fmt: skip


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    interpret: bool | None = None,
) -> jax.Array:
    """The Pallas splash attention kernel (TPU), on (B, T, N, H) with segment ids.

    Splash takes one example at a time in (heads, length, head_dim) layout and does not scale
    by 1/sqrt(d), so q is pre-scaled and the batch vmapped. Off TPU it runs interpreted (slow;
    for tests). Under a device mesh it runs per shard through shard_map: batch over the batch
    axes, heads over the head axes, as the logical rules say.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if interpret is None:
        interpret = jax.devices()[0].platform != "tpu"

    def per_shard(q, k, v, q_seg, kv_seg):
        _, t, n, h = q.shape
        s = k.shape[1]
        mask = sm.MultiHeadMask(tuple(sm.CausalMask((t, s)) for _ in range(n)))
        kernel = sk.make_splash_mha(
            mask,
            head_shards=1,
            q_seq_shards=1,
            block_sizes=_splash_block_sizes(t, s),
            interpret=interpret,
        )
        scaled = (q / jnp.sqrt(jnp.float32(h)).astype(q.dtype)).transpose(0, 2, 1, 3)
        k_, v_ = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        segments = sk.SegmentIds(q=q_seg, kv=kv_seg)
        out = jax.vmap(kernel)(scaled, k_, v_, segment_ids=segments)
        return out.transpose(0, 2, 1, 3)

    mesh = _current_mesh()
    if mesh is None or mesh.size == 1:
        return per_shard(q, k, v, q_segment_ids, kv_segment_ids)
    import flax.linen as nn
    from jax.sharding import PartitionSpec

    qkv_spec = nn.logical_to_mesh_axes(("batch", None, "act_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("batch", None, "act_kv_heads", None))
    seg_spec = PartitionSpec(qkv_spec[0], None)
    if not all(
        _divides(mesh, spec, x.shape) for spec, x in ((qkv_spec, q), (kv_spec, k), (seg_spec, q))
    ):
        # Shapes the mesh does not divide (model.init traces a batch of one): run unsharded.
        return per_shard(q, k, v, q_segment_ids, kv_segment_ids)
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(qkv_spec, kv_spec, kv_spec, seg_spec, seg_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, q_segment_ids, kv_segment_ids)


def _divides(mesh, spec, shape) -> bool:
    for dim, axes in zip(shape, spec, strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = 1
        for name in names:
            size *= mesh.shape[name]
        if dim % size:
            return False
    return True


def _current_mesh():
    """The mesh of the enclosing `with mesh:` block, if any."""
    from jax._src import mesh as mesh_lib

    mesh = mesh_lib.thread_resources.env.physical_mesh
    return None if mesh.empty else mesh


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    kernel: AttentionKernel = AttentionKernel.xla,
) -> jax.Array:
    """Masked multi-head attention with the selected kernel."""
    if kernel == AttentionKernel.splash:
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids)
    mask = attention_mask(q_segment_ids, kv_segment_ids)
    if kernel == AttentionKernel.reference:
        return reference_attention(q, k, v, mask)
    if kernel == AttentionKernel.xla:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if kernel == AttentionKernel.cudnn:
        # is_causal selects cuDNN's fused causal path; the mask adds the segment boundaries.
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation="cudnn"
        )
    raise ValueError(f"unknown attention kernel {kernel!r}")


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    start: jax.Array,
    kernel: AttentionKernel = AttentionKernel.xla,
) -> jax.Array:
    """Attention of T new queries at cache positions start.. over a (B, S, K, H) cache.

    Query j (at absolute position start + j) sees cached position s <= start + j of its own
    non-padding segment; cache slots not yet written have segment 0 and are never seen.
    """
    t, s = q.shape[1], k_cache.shape[1]
    q_pos = start + jnp.arange(t)
    causal = jnp.arange(s)[None, :] <= q_pos[:, None]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = (causal[None] & same & (kv_segment_ids != 0)[:, None, :])[:, None]
    if kernel == AttentionKernel.reference:
        return reference_attention(q, k_cache, v_cache, mask)
    # Decoding is memory-bound and its mask is not causal-from-zero: XLA serves every platform.
    return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask, implementation="xla")
