"""Attention kernels behind one function, and the masks they share.

Names carry their shapes (letters as in `flaxlm.model`: B batch, T query length, S key length,
N query heads, K key/value heads, G = N // K query heads per key/value head, H head dim). All
kernels take q_BxTxNxH, k_BxSxKxH and v_BxSxKxH (grouped-query attention: each key/value head
serves G query heads) and return out_BxTxNxH. Which tokens may attend to which is described by
segment ids, never by a hand-built mask: token t sees token s when s <= t (causal) and both belong
to the same non-zero segment (packed documents never see each other; segment 0 is padding).
Encoders (`causal=False`) drop the causal condition: each token sees its whole segment.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flaxlm.config import AttentionKernel
from flaxlm.context_parallel import inverse
from flaxlm.mesh import current_mesh, current_platform, divides, shard_count


def attention_mask(
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    window: int | None = None,
    order_T: np.ndarray | None = None,
    causal: bool = True,
) -> jax.Array:
    """Boolean mask_Bx1xTxS: causal (unless `causal=False`) and within one non-padding
    segment (and, with a sliding window W, at most W - 1 positions back).

    Assumes queries are the last T of the S key positions (T == S for training). With order_T
    (context parallelism: a row reordered so that `order_T[t]` is the original index of its
    position t; `flaxlm.context_parallel`), queries and keys are both reordered so, and
    causality follows the original indices.
    """
    t, s = q_segment_ids_BxT.shape[-1], kv_segment_ids_BxS.shape[-1]
    if order_T is not None:
        q_pos_T = kv_pos_S = jnp.asarray(order_T)
    else:
        q_pos_T, kv_pos_S = jnp.arange(t) + (s - t), jnp.arange(s)
    return position_mask(q_pos_T, kv_pos_S, q_segment_ids_BxT, kv_segment_ids_BxS, window, causal)


def position_mask(
    q_pos_T: jax.Array,
    kv_pos_S: jax.Array,
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    window: int | None = None,
    causal: bool = True,
) -> jax.Array:
    """Boolean mask_Bx1xTxS from absolute positions: query t sees key s when kv_pos_S[s] <=
    q_pos_T[t] (and, with a sliding window W, kv_pos_S[s] > q_pos_T[t] - W) and both are in
    the same non-padding segment. The one mask of training, cached and ring-buffer decoding."""
    q_pos_Tx1, k_pos_1xS = q_pos_T[:, None], kv_pos_S[None, :]
    causal_TxS = k_pos_1xS <= q_pos_Tx1 if causal else jnp.ones_like(k_pos_1xS <= q_pos_Tx1)
    if window is not None:
        causal_TxS &= q_pos_Tx1 - k_pos_1xS < window
    same_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    real_Bx1xS = (kv_segment_ids_BxS != 0)[:, None, :]
    return (causal_TxS[None] & same_BxTxS & real_Bx1xS)[:, None]


def reference_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    mask_Bx1xTxS: jax.Array,
    weights_fn: Callable[[jax.Array], jax.Array] | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)) V written out with einsums; the oracle for the other kernels.

    Logits and softmax are computed in float32 whatever the input dtype. `weights_fn`, if given,
    transforms the attention probabilities (attention dropout in training); `softcap` caps the
    logits as cap * tanh(x / cap) (Gemma 2).
    """
    b, t, n, h = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    logits_BxKxGxTxS = jnp.einsum(
        "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    )
    logits_BxKxGxTxS = logits_BxKxGxTxS / jnp.sqrt(jnp.float32(h))
    if softcap is not None:
        logits_BxKxGxTxS = softcap * jnp.tanh(logits_BxKxGxTxS / softcap)
    # The mask broadcasts over (K, G).
    mask_Bx1x1xTxS = mask_Bx1xTxS[:, :, None]
    logits_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, logits_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    weights_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
    if weights_fn is not None:
        weights_BxKxGxTxS = weights_fn(weights_BxKxGxTxS)
    weights_BxKxGxTxS = weights_BxKxGxTxS.astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", weights_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


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
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    interpret: bool | None = None,
    window: int | None = None,
    softcap: float | None = None,
    order_T: np.ndarray | None = None,
    causal: bool = True,
) -> jax.Array:
    """The Pallas splash attention kernel (TPU), on q_BxTxNxH with segment ids (and a sliding
    window of W positions: the kernel's local mask, which also skips the blocks outside it).
    With order_T, the row is reordered for context parallelism: see `_context_splash`.

    Splash takes one example at a time in (heads, length, head_dim) layout and does not scale
    by 1/sqrt(d), so q is pre-scaled and the batch vmapped. Off TPU it runs interpreted (slow;
    for tests). Under a device mesh it runs per shard through shard_map: batch over the batch
    axes, heads over the head axes, as the logical rules say.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if interpret is None:
        # The mesh's platform, not this process's: compiling for a TPU topology on a CPU host
        # must produce the Mosaic kernel, not the interpreter's loop.
        interpret = current_platform() != "tpu"

    def per_shard(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_seg_BxT, kv_seg_BxS):
        _, t, n, _ = q_BxTxNxH.shape
        s = k_BxSxKxH.shape[1]
        if not causal:
            head_mask = sm.FullMask((t, s))
        elif window is None:
            head_mask = sm.CausalMask((t, s))
        else:
            head_mask = sm.LocalMask((t, s), window_size=(window - 1, 0), offset=s - t)
        mask = sm.MultiHeadMask(tuple(head_mask for _ in range(n)))
        kernel = sk.make_splash_mha(
            mask,
            head_shards=1,
            q_seq_shards=1,
            block_sizes=_splash_block_sizes(t, s),
            attn_logits_soft_cap=softcap,
            interpret=interpret,
        )
        return _apply_splash(kernel, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_seg_BxT, kv_seg_BxS)

    args = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxT, kv_segment_ids_BxS)
    mesh = current_mesh()
    if order_T is not None:
        return _context_splash(*args, order_T, mesh, window, softcap, interpret)
    if mesh is None or mesh.size == 1:
        return per_shard(*args)

    q_spec = nn.logical_to_mesh_axes(("batch", None, "act_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("batch", None, "act_kv_heads", None))
    seg_spec = PartitionSpec(q_spec[0], None)
    shapes = ((q_spec, q_BxTxNxH), (kv_spec, k_BxSxKxH), (seg_spec, q_BxTxNxH))
    if not all(divides(mesh, spec, x.shape) for spec, x in shapes):
        # Shapes the mesh does not divide (model.init traces a batch of one): run unsharded.
        return per_shard(*args)
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )(*args)


def _apply_splash(
    kernel,
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
) -> jax.Array:
    """Runs a splash kernel on a batch: splash takes one example at a time in (heads, length,
    head_dim) layout and does not scale by 1/sqrt(d), so q is pre-scaled and the batch vmapped."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    h = q_BxTxNxH.shape[-1]
    scale = jnp.sqrt(jnp.float32(h)).astype(q_BxTxNxH.dtype)
    q_BxNxTxH = (q_BxTxNxH / scale).transpose(0, 2, 1, 3)
    k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
    segments = sk.SegmentIds(q=q_segment_ids_BxT, kv=kv_segment_ids_BxS)
    out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids=segments)
    return out_BxNxTxH.transpose(0, 2, 1, 3)


def _context_splash(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    order_T: np.ndarray,
    mesh,
    window: int | None,
    softcap: float | None,
    interpret: bool,
) -> jax.Array:
    """Splash attention on a row reordered for context parallelism (`flaxlm.context_parallel`).

    Keys and values arrive whole (all-gathered) and go back to the row's own order, a local
    gather; queries keep the reordered layout, each context shard its own chunks. One kernel
    covers the whole T x S mask with the queries' original indices as its `q_sequence`, so its
    causal (or local) mask follows them; the kernel's block tables are split over the context
    axis like the queries (`manual_sharding_spec`), so each shard skips the blocks its own
    chunks never see.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    inverse_S = inverse(order_T)
    k_BxSxKxH, v_BxSxKxH = k_BxSxKxH[:, inverse_S], v_BxSxKxH[:, inverse_S]
    kv_segment_ids_BxS = kv_segment_ids_BxS[:, inverse_S]
    _, t, n, _ = q_BxTxNxH.shape
    s = k_BxSxKxH.shape[1]
    q_spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("batch", None, "act_kv_heads", None))
    seq_axes, head_axes = q_spec[1], q_spec[2]
    # Shapes the mesh does not divide (model.init traces a batch of one): one unsharded kernel.
    sharded = all(
        divides(mesh, spec, x.shape) for spec, x in ((q_spec, q_BxTxNxH), (kv_spec, k_BxSxKxH))
    )
    shards = lambda entry: shard_count(mesh, entry) if sharded else 1  # noqa: E731
    if window is None:
        head_mask = sm.CausalMask((t, s), shard_count=shards(seq_axes))
    else:
        head_mask = sm.LocalMask((t, s), (window - 1, 0), offset=0, shard_count=shards(seq_axes))
    head_mask.q_sequence = np.asarray(order_T, np.int32)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask(tuple(head_mask for _ in range(n))),
        head_shards=shards(head_axes),
        q_seq_shards=shards(seq_axes),
        block_sizes=_splash_block_sizes(t // shards(seq_axes), s),
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )

    per_shard = _apply_splash
    args = (kernel, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxT, kv_segment_ids_BxS)
    if not sharded:
        return per_shard(*args)
    kernel_spec = kernel.manual_sharding_spec(
        NamedSharding(mesh, PartitionSpec(head_axes, seq_axes))
    )
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(
            kernel_spec, q_spec, kv_spec, kv_spec,
            PartitionSpec(q_spec[0], seq_axes), PartitionSpec(q_spec[0], None),
        ),
        out_specs=q_spec,
        check_vma=False,
    )(*args)  # fmt: skip


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    kernel: AttentionKernel = AttentionKernel.xla,
    window: int | None = None,
    softcap: float | None = None,
    order_T: np.ndarray | None = None,
    causal: bool = True,
) -> jax.Array:
    """Masked multi-head attention with the selected kernel: out_BxTxNxH (window: sliding
    window length, None for the whole causal prefix; softcap: logit soft-capping, which the
    XLA and cuDNN kernels lack, so they hand it to the reference kernel; order_T: the original
    index of each position of a row reordered for context parallelism, see `attention_mask`;
    causal=False: each token sees its whole segment, as in an encoder)."""
    q, k, v = q_BxTxNxH, k_BxSxKxH, v_BxSxKxH
    if kernel == AttentionKernel.splash:
        return splash_attention(
            q, k, v, q_segment_ids_BxT, kv_segment_ids_BxS, window=window, softcap=softcap,
            order_T=order_T, causal=causal,
        )  # fmt: skip
    mask_Bx1xTxS = attention_mask(q_segment_ids_BxT, kv_segment_ids_BxS, window, order_T, causal)
    # cuDNN's causal flag means causal in row order, which a reordered row is not.
    if kernel == AttentionKernel.cudnn and softcap is None and order_T is None:
        # is_causal selects cuDNN's fused causal path; the mask adds the segment boundaries.
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask_Bx1xTxS, is_causal=causal, implementation="cudnn"
        )
    if kernel in (AttentionKernel.reference, AttentionKernel.xla, AttentionKernel.cudnn):
        return masked_attention(q, k, v, mask_Bx1xTxS, kernel, softcap)
    raise ValueError(f"unknown attention kernel {kernel!r}")


def cached_attention(
    q_BxTxNxH: jax.Array,
    k_cache_BxSxKxH: jax.Array,
    v_cache_BxSxKxH: jax.Array,
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    start: jax.Array,
    kernel: AttentionKernel = AttentionKernel.xla,
    softcap: float | None = None,
) -> jax.Array:
    """Attention of T new queries at cache positions start.. over a cache of S positions.

    Query j (at absolute position start + j) sees cached position s <= start + j of its own
    non-padding segment; cache slots not yet written have segment 0 and are never seen.
    """
    q_pos_T = start + jnp.arange(q_BxTxNxH.shape[1])
    kv_pos_S = jnp.arange(k_cache_BxSxKxH.shape[1])
    mask_Bx1xTxS = position_mask(q_pos_T, kv_pos_S, q_segment_ids_BxT, kv_segment_ids_BxS)
    return masked_attention(
        q_BxTxNxH, k_cache_BxSxKxH, v_cache_BxSxKxH, mask_Bx1xTxS, kernel, softcap
    )


def masked_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    mask_Bx1xTxS: jax.Array,
    kernel: AttentionKernel = AttentionKernel.xla,
    softcap: float | None = None,
) -> jax.Array:
    """Attention under an explicit mask: the reference kernel when asked for or when logits
    are soft-capped (XLA's and cuDNN's kernels cannot), else XLA's. The decode caches build
    their own masks and use it directly."""
    q, k, v = q_BxTxNxH, k_BxSxKxH, v_BxSxKxH
    if kernel == AttentionKernel.reference or softcap is not None:
        return reference_attention(q, k, v, mask_Bx1xTxS, softcap=softcap)
    # Decoding is memory-bound and its mask is not causal-from-zero: XLA serves every platform
    # (training reaches here for the xla kernel only).
    return jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xTxS, implementation="xla")
