"""The self-attention layer: projections, positions, the attention kernel and the decode cache.

Shape letters as in `flaxlm.model`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxlm.attention import cached_attention, dot_product_attention
from flaxlm.config import ModelConfig, Position
from flaxlm.layers import constrain, dtype_of, normal_init
from flaxlm.positions import apply_rope, rope_frequencies

Array = jax.Array


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention over packed segments.

    With `decode=True` keys and values go into a cache (the "cache" collection, sized by the
    input at `init`), so that each call attends to everything cached so far: a prompt is
    prefilled in one call and each new token then costs one position, not the whole prefix.
    """

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array) -> Array:
        cfg = self.cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        head_dim = cfg.dim_per_head

        def proj(name: str, heads: int, axis: str) -> Array:
            return nn.DenseGeneral(
                features=(heads, head_dim),
                use_bias=cfg.use_bias,
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
        if cfg.position == Position.rope:
            inv_freq_R = rope_frequencies(cfg)
            q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, inv_freq_R)
            k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq_R)
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (
            checkpoint_name(a, "qkv") for a in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
        )
        q_BxTxNxH = constrain(q_BxTxNxH, ("batch", "length", "act_heads", None))
        k_BxTxKxH = constrain(k_BxTxKxH, ("batch", "length", "act_kv_heads", None))
        v_BxTxKxH = constrain(v_BxTxKxH, ("batch", "length", "act_kv_heads", None))
        if self.decode:
            out_BxTxNxH = self._cached_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
        else:
            out_BxTxNxH = dot_product_attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, segment_ids_BxT, cfg.attention
            )
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
        kernel = self.cfg.attention
        if not initialized:  # init only sizes the cache
            return dot_product_attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, segment_ids_BxT, kernel
            )
        start = index.value
        k_BxSxKxH = _write_at(k_cache, k_BxTxKxH, start)
        v_BxSxKxH = _write_at(v_cache, v_BxTxKxH, start)
        segments_BxS = _write_at(segments, segment_ids_BxT, start)
        index.value = start + q_BxTxNxH.shape[1]
        return cached_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, segments_BxS, start, kernel
        )


def _write_at(cache: nn.Variable, new_BxT: Array, start: Array) -> Array:
    """Writes new_BxTx... into the cache (B x S x ...) from position start on; the new cache."""
    offsets = (0, start) + (0,) * (new_BxT.ndim - 2)
    cache.value = jax.lax.dynamic_update_slice(
        cache.value, new_BxT.astype(cache.value.dtype), offsets
    )
    return cache.value
