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
    """inv_freq_R: inverse frequencies of the rotary embedding, with Llama 3 long-context scaling
    if set.

    Llama 3.1+ keeps the high frequencies, divides the low ones by `rope_scaling_factor`, and
    interpolates smoothly in between (wavelengths measured against the original context).
    """
    h = cfg.dim_per_head
    inv_freq_R = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
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


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_R: jax.Array) -> jax.Array:
    """Rotary embeddings, rotate-half convention (Llama / Hugging Face): x_BxTxNxH rotated.

    Angles and their sines and cosines are computed in float32 (positions up to the context
    length need its precision); the rotation itself runs in x's dtype, so that bfloat16 queries
    and keys (and their recomputation and gradients) are never written in float32.
    """
    h = x_BxTxNxH.shape[-1]
    angles_BxTxR = positions_BxT[..., None].astype(jnp.float32) * inv_freq_R
    cos_BxTx1xR = jnp.cos(angles_BxTxR)[:, :, None, :].astype(x_BxTxNxH.dtype)
    sin_BxTx1xR = jnp.sin(angles_BxTxR)[:, :, None, :].astype(x_BxTxNxH.dtype)
    x1_BxTxNxR, x2_BxTxNxR = x_BxTxNxH[..., : h // 2], x_BxTxNxH[..., h // 2 :]
    return jnp.concatenate(
        [
            x1_BxTxNxR * cos_BxTx1xR - x2_BxTxNxR * sin_BxTx1xR,
            x2_BxTxNxR * cos_BxTx1xR + x1_BxTxNxR * sin_BxTx1xR,
        ],
        axis=-1,
    )
