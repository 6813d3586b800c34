"""Position encodings: the sinusoidal table of Vaswani et al. and rotary embeddings (RoPE).

Names carry their shapes, with the letters of `flaxlm.model` (B batch, T length, N heads, H head
dim, D model width, R = H / 2 rotary frequencies). Learned absolute positions are an embedding
table, a parameter of the model itself (`flaxlm.model.Transformer`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flaxlm.config import ModelConfig, RopeScaling


def sinusoidal_encoding(positions_BxT: jax.Array, d_model: int) -> jax.Array:
    """pe_BxTxD: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...), interleaved as in
    the paper."""
    i_R = jnp.arange(d_model // 2, dtype=jnp.float32)
    inv_freq_R = jnp.exp(-math.log(10000.0) * 2.0 * i_R / d_model)
    angles_BxTxR = positions_BxT[..., None].astype(jnp.float32) * inv_freq_R
    pe_BxTxRx2 = jnp.stack([jnp.sin(angles_BxTxR), jnp.cos(angles_BxTxR)], axis=-1)
    return pe_BxTxRx2.reshape(*positions_BxT.shape, d_model)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """inv_freq_R: inverse frequencies of the rotary embedding, with long-context scaling if set.

    - llama3 (Llama 3.1+) keeps the high frequencies, divides the low ones by
      `rope_scaling_factor`, and interpolates smoothly in between (wavelengths measured against
      the original context);
    - linear (position interpolation) divides every frequency by the factor;
    - yarn keeps the frequencies that turn more than `rope_yarn_beta_fast` times over the
      original context, divides those that turn fewer than `rope_yarn_beta_slow` times, and
      ramps linearly between (the ramp's ends rounded outwards to whole dimensions).
    """
    h = cfg.dim_per_head
    inv_freq_R = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_scaling == RopeScaling.linear:
        return inv_freq_R / cfg.rope_scaling_factor
    if cfg.rope_scaling == RopeScaling.yarn:
        return _yarn_frequencies(cfg, inv_freq_R)
    if cfg.rope_scaling != RopeScaling.llama3:
        return inv_freq_R
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    wavelen_R = 2 * math.pi / inv_freq_R
    scaled_R = jnp.where(wavelen_R > old_len / low, inv_freq_R / factor, inv_freq_R)
    smooth_R = (old_len / wavelen_R - low) / (high - low)
    smoothed_R = (1 - smooth_R) * scaled_R / factor + smooth_R * scaled_R
    medium_R = (wavelen_R >= old_len / high) & (wavelen_R <= old_len / low)
    return jnp.where(medium_R, smoothed_R, scaled_R)


def _yarn_frequencies(cfg: ModelConfig, inv_freq_R: jax.Array) -> jax.Array:
    h, base, old_len = cfg.dim_per_head, cfg.rope_theta, cfg.rope_original_max_len

    def dimension(rotations: float) -> float:  # the dimension that turns this often in old_len
        return h * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dimension(cfg.rope_yarn_beta_fast)), 0)
    high = min(math.ceil(dimension(cfg.rope_yarn_beta_slow)), h - 1)
    high = high + 0.001 if low == high else high
    ramp_R = jnp.clip((jnp.arange(h // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return inv_freq_R / cfg.rope_scaling_factor * ramp_R + inv_freq_R * (1 - ramp_R)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor on cos and sin: YaRN's attention temperature (1 for the other scalings)."""
    if cfg.rope_scaling != RopeScaling.yarn:
        return 1.0
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    return 0.1 * math.log(cfg.rope_scaling_factor) + 1.0 if cfg.rope_scaling_factor > 1 else 1.0


def apply_rope(
    x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_R: jax.Array, scale: float = 1.0
) -> jax.Array:
    """Rotary embeddings, rotate-half convention (Llama / Hugging Face): x_BxTxNxH rotated, and
    multiplied by scale (YaRN's attention factor, applied to queries and keys alike).

    Angles and their sines and cosines are computed in float32 (positions up to the context
    length need its precision); the rotation itself runs in x's dtype, so that bfloat16 queries
    and keys (and their recomputation and gradients) are never written in float32.
    """
    h = x_BxTxNxH.shape[-1]
    angles_BxTxR = positions_BxT[..., None].astype(jnp.float32) * inv_freq_R
    cos_BxTx1xR = (scale * jnp.cos(angles_BxTxR))[:, :, None, :].astype(x_BxTxNxH.dtype)
    sin_BxTx1xR = (scale * jnp.sin(angles_BxTxR))[:, :, None, :].astype(x_BxTxNxH.dtype)
    x1_BxTxNxR, x2_BxTxNxR = x_BxTxNxH[..., : h // 2], x_BxTxNxH[..., h // 2 :]
    return jnp.concatenate(
        [
            x1_BxTxNxR * cos_BxTx1xR - x2_BxTxNxR * sin_BxTx1xR,
            x2_BxTxNxR * cos_BxTx1xR + x1_BxTxNxR * sin_BxTx1xR,
        ],
        axis=-1,
    )
