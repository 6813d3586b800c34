"""The building blocks shared by the model families: norms, the feed-forward block, and the
helpers every layer uses (dtypes, initialisers, dropout, logical activation constraints).

Shape letters as in `flaxlm.model`.
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxlm.config import Mlp, ModelConfig, Norm
from flaxlm.mesh import logical_constraint

Array = jax.Array
# Norm scales and biases stay replicated: sharding d_model floats over FSDP saves nothing and
# costs two tiny collectives per norm and step (gather forward, reduce backward), pure latency.
NORM_AXES = (None,)


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def normal_init(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Activation sharding by logical names (a no-op outside a mesh / rules context)."""
    return logical_constraint(x, names)


def dropout(module: nn.Module, rate: float, x: Array) -> Array:
    """Inverted dropout while training (a "dropout" RNG is given); the identity otherwise, and
    always at rate 0 (then nothing is traced: the step is exactly the one without dropout)."""
    if rate == 0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def embedding(cfg: ModelConfig, rows: int, row_axis: str | None, name: str) -> nn.Embed:
    """A table of `rows` d_model-wide embeddings (tokens, learned positions or token types),
    sharded as (row_axis, embed)."""
    return nn.Embed(
        rows,
        cfg.d_model,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(normal_init(cfg.init_std), (row_axis, "embed")),
        name=name,
    )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    # Logical name of the normalised axis: ("head_dim",) for the per-head q/k norms of Qwen3.
    axes: tuple[str | None, ...] = NORM_AXES
    # Gemma: multiply by (1 + scale), the scale starting at zero.
    offset: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(
                nn.initializers.zeros if self.offset else nn.initializers.ones, self.axes
            ),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = scale.astype(jnp.float32) + (1.0 if self.offset else 0.0)
        return (y * scale).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    if cfg.norm == Norm.rmsnorm:
        return RMSNorm(
            eps=cfg.norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            offset=cfg.norm_scale_offset,
            name=name,
        )
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=True,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, NORM_AXES),
        # Statistics in float32 even when activations are bfloat16.
        force_float32_reductions=True,
        # Two-pass variance: E[(x-mean)^2] matches reference implementations in float32.
        use_fast_variance=False,
        name=name,
    )


class FeedForward(nn.Module):
    """GELU MLP (GPT-2, BERT), SwiGLU (Llama) or GeGLU (Gemma): down(act(up(x))) or
    down(act(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        cfg = self.cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)

        def dense(name: str, features: int, axes: tuple[str, str], std: float) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=cfg.use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(normal_init(std), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
                name=name,
            )

        up_BxTxF = dense("up", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BxTxD)
        if cfg.mlp in (Mlp.swiglu, Mlp.geglu):
            gate_BxTxF = dense("gate", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BxTxD)
            act = nn.silu if cfg.mlp == Mlp.swiglu else partial(nn.gelu, approximate=True)
            hidden_BxTxF = act(gate_BxTxF) * up_BxTxF
        else:
            # GPT-2 uses the tanh approximation of GELU, BERT the exact erf form.
            hidden_BxTxF = nn.gelu(up_BxTxF, approximate=cfg.mlp != Mlp.gelu_exact)
        hidden_BxTxF = constrain(hidden_BxTxF, ("batch", "length", "act_mlp"))
        hidden_BxTxF = checkpoint_name(hidden_BxTxF, "mlp_hidden")
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return dense("down", cfg.d_model, ("mlp", "embed"), out_std)(hidden_BxTxF)
