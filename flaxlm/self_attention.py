"""The self-attention layer: projections, positions, the attention kernel and the decode cache.

Shape letters as in `flaxlm.model`; C is the number of slots of a sliding-window ring cache.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxlm.attention import (
    attention_mask,
    cached_attention,
    dot_product_attention,
    masked_attention,
    position_mask,
    reference_attention,
)
from flaxlm.config import Arch, ModelConfig, Position
from flaxlm.context_parallel import load_balanced_order
from flaxlm.layers import RMSNorm, constrain, dtype_of, normal_init
from flaxlm.positions import apply_rope, rope_attention_factor, rope_frequencies

Array = jax.Array


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention over packed segments
    (bidirectional within each segment for an encoder).

    With `decode=True` keys and values go into a cache (the "cache" collection, sized by the
    input at `init`), so that each call attends to everything cached so far: a prompt is
    prefilled in one call and each new token then costs one position, not the whole prefix.
    With a sliding window of W positions the cache is a ring buffer of min(W, S) slots.
    `window` is this layer's sliding window (None: the whole causal prefix). Attention dropout
    is on while a "dropout" RNG is given (training) and model.dropout_attn > 0.
    """

    cfg: ModelConfig
    decode: bool = False
    window: int | None = None

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array) -> Array:
        cfg = self.cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        head_dim = cfg.dim_per_head

        def proj(name: str, heads: int, axis: str) -> Array:
            return nn.DenseGeneral(
                features=(heads, head_dim),
                use_bias=cfg.use_bias or cfg.qkv_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    normal_init(cfg.init_std), ("embed", axis, "head_dim")
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis, "head_dim")),
                name=name,
            )(x_BxTxD)

        q_BxTxNxH = proj("query", cfg.n_heads, "heads")
        k_BxTxKxH = proj("key", cfg.kv_heads, "kv_heads")
        v_BxTxKxH = proj("value", cfg.kv_heads, "kv_heads")
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head, before the rotation
            norm = lambda name: RMSNorm(  # noqa: E731
                cfg.norm_eps, dtype, param_dtype, ("head_dim",), cfg.norm_scale_offset, name=name
            )
            q_BxTxNxH, k_BxTxKxH = norm("query_norm")(q_BxTxNxH), norm("key_norm")(k_BxTxKxH)
        if cfg.position == Position.rope:
            inv_freq_R, scale = rope_frequencies(cfg), rope_attention_factor(cfg)
            q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, inv_freq_R, scale)
            k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq_R, scale)
        if cfg.query_scale is not None:  # the kernels divide by sqrt(head_dim): correct for it
            q_BxTxNxH = q_BxTxNxH * jnp.asarray(
                math.sqrt(head_dim / cfg.query_scale), q_BxTxNxH.dtype
            )
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (
            checkpoint_name(a, "qkv") for a in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
        )
        # Context parallelism (the model reordered the row): queries stay split over the
        # context axis, every shard needs every key and value (all-gathered here).
        order_T = None if self.decode else load_balanced_order(x_BxTxD.shape[1])
        kv_length = "length" if order_T is None else None
        q_BxTxNxH = constrain(q_BxTxNxH, ("batch", "length", "act_heads", None))
        k_BxTxKxH = constrain(k_BxTxKxH, ("batch", kv_length, "act_kv_heads", None))
        v_BxTxKxH = constrain(v_BxTxKxH, ("batch", kv_length, "act_kv_heads", None))
        qkv = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
        causal = cfg.arch != Arch.encoder  # an encoder sees its whole segment
        if self.decode and self.window is not None:
            out_BxTxNxH = self._ring_attention(*qkv, segment_ids_BxT)
        elif self.decode:
            out_BxTxNxH = self._cached_attention(*qkv, segment_ids_BxT)
        elif cfg.dropout_attn > 0 and self.has_rng("dropout"):
            # Dropout needs the probabilities themselves: the explicit kernel.
            mask_Bx1xTxS = attention_mask(
                segment_ids_BxT, segment_ids_BxT, self.window, order_T, causal
            )
            out_BxTxNxH = reference_attention(
                *qkv, mask_Bx1xTxS, self._attention_dropout, cfg.attn_logit_softcap
            )
        else:
            out_BxTxNxH = dot_product_attention(
                *qkv, segment_ids_BxT, segment_ids_BxT, cfg.attention, self.window,
                cfg.attn_logit_softcap, order_T, causal,
            )  # fmt: skip
        out_BxTxNxH = checkpoint_name(
            constrain(out_BxTxNxH, ("batch", "length", "act_heads", None)), "attn_out"
        )
        # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * layers).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return nn.DenseGeneral(
            features=cfg.d_model,
            axis=(-2, -1),
            use_bias=cfg.use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nn.with_logical_partitioning(
                normal_init(out_std), ("heads", "head_dim", "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out_BxTxNxH)

    def _attention_dropout(self, weights: Array) -> Array:
        """Inverted dropout on the attention probabilities (a fresh mask per layer and step)."""
        rate = self.cfg.dropout_attn
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, weights.shape)
        return jnp.where(keep, weights / (1.0 - rate), 0.0)

    def _cached_attention(
        self, q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, segment_ids_BxT: Array
    ) -> Array:
        """Writes the T new keys and values at the cache index and attends over all S slots."""
        # Names differ from the "key"/"value" projection submodules, which share the namespace.
        # The cache is sized at init, where T is the whole S.
        initialized = self.has_variable("cache", "cached_key")
        k_cache = self.variable("cache", "cached_key", jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
        v_cache = self.variable(
            "cache", "cached_value", jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype
        )
        segments = self.variable(
            "cache", "cached_segment_ids", jnp.zeros, segment_ids_BxT.shape, jnp.int32
        )
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        kernel, softcap = self.cfg.attention, self.cfg.attn_logit_softcap
        if not initialized:  # init only sizes the cache
            return dot_product_attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, segment_ids_BxT, kernel,
                softcap=softcap,
            )  # fmt: skip
        start = index.value
        k_BxSxKxH = _write_at(k_cache, k_BxTxKxH, start)
        v_BxSxKxH = _write_at(v_cache, v_BxTxKxH, start)
        segments_BxS = _write_at(segments, segment_ids_BxT, start)
        index.value = start + q_BxTxNxH.shape[1]
        return cached_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, segments_BxS, start, kernel, softcap
        )

    def _ring_attention(
        self, q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, segment_ids_BxT: Array
    ) -> Array:
        """Sliding-window decoding over a ring buffer of C = min(W, S) slots.

        The T new queries attend over the C cached slots followed by the T new keys (every
        position older than C slots back is outside every query's window); then the newest
        min(T, C) keys overwrite the oldest slots. Each slot remembers its absolute position.
        """
        b, t, kv_heads, h = k_BxTxKxH.shape
        initialized = self.has_variable("cache", "cached_key")
        c = min(self.window, t)  # at init T is the whole S
        shape_BxCxKxH = (b, c, kv_heads, h)
        k_cache = self.variable("cache", "cached_key", jnp.zeros, shape_BxCxKxH, k_BxTxKxH.dtype)
        v_cache = self.variable("cache", "cached_value", jnp.zeros, shape_BxCxKxH, v_BxTxKxH.dtype)
        segments = self.variable("cache", "cached_segment_ids", jnp.zeros, (b, c), jnp.int32)
        slot_pos = self.variable("cache", "cached_positions", jnp.zeros, (c,), jnp.int32)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # init only sizes the cache
            return dot_product_attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, segment_ids_BxT,
                window=self.window, softcap=self.cfg.attn_logit_softcap,
            )  # fmt: skip
        c = k_cache.value.shape[1]
        start = index.value
        q_pos_T = start + jnp.arange(t)
        k_BxSxKxH = jnp.concatenate([k_cache.value, k_BxTxKxH.astype(k_cache.value.dtype)], 1)
        v_BxSxKxH = jnp.concatenate([v_cache.value, v_BxTxKxH.astype(v_cache.value.dtype)], 1)
        kv_seg_BxS = jnp.concatenate([segments.value, segment_ids_BxT], 1)
        kv_pos_S = jnp.concatenate([slot_pos.value, q_pos_T])
        mask_Bx1xTxS = position_mask(q_pos_T, kv_pos_S, segment_ids_BxT, kv_seg_BxS, self.window)
        # The newest min(T, C) positions go to slots position % C (distinct: consecutive).
        keep = min(t, c)
        slots = (start + t - keep + jnp.arange(keep)) % c
        k_cache.value = k_cache.value.at[:, slots].set(k_BxSxKxH[:, -keep:])
        v_cache.value = v_cache.value.at[:, slots].set(v_BxSxKxH[:, -keep:])
        segments.value = segments.value.at[:, slots].set(segment_ids_BxT[:, -keep:])
        slot_pos.value = slot_pos.value.at[slots].set(q_pos_T[-keep:])
        index.value = start + t
        return masked_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, self.cfg.attention,
            self.cfg.attn_logit_softcap,
        )  # fmt: skip


def _write_at(cache: nn.Variable, new_BxT: Array, start: Array) -> Array:
    """Writes new_BxTx... into the cache (B x S x ...) from position start on; the new cache."""
    offsets = (0, start) + (0,) * (new_BxT.ndim - 2)
    cache.value = jax.lax.dynamic_update_slice(
        cache.value, new_BxT.astype(cache.value.dtype), offsets
    )
    return cache.value
