"""The decoder-only Transformer (Flax linen): parameters in, logits out.

One module covers both families through `ModelConfig`:

- GPT-2: LayerNorm, GELU MLP, learned absolute positions, biases, tied input/output embeddings.
- Llama: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases, untied output.
- The classic sinusoidal encoding of Vaswani et al. (x + PE(p)) is a third position choice.

Blocks are pre-norm: x + Attn(Norm(x)), then x + MLP(Norm(x)). Every parameter carries logical
axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`) and the main activations are
constrained by logical names at block boundaries; `flaxlm.mesh` maps names to mesh axes.

Shapes in names (nanodo style): `x_BxTxD`, `q_BxTxNxH`, `mask_Bx1xTxS`, `logits_BxTxV`. The
letters, here and in `flaxlm.attention`, `flaxlm.positions`, `flaxlm.generate` and the losses of
`flaxlm.train`: B batch, T length (of the queries), S key length (of the cache), D model width,
F MLP width, N query heads, K key/value heads, G = N // K query heads per key/value head, H head
dim, R = H / 2 rotary frequencies, V vocabulary, L layers, A micro-batches of one step, M new
tokens of a decode.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxlm.attention import cached_attention, dot_product_attention
from flaxlm.config import Mlp, ModelConfig, Norm, Position, Remat
from flaxlm.mesh import current_mesh
from flaxlm.positions import apply_rope, rope_frequencies, sinusoidal_encoding

Array = jax.Array


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _init(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def _constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Activation sharding by logical names (a no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    if cfg.norm == Norm.rmsnorm:
        return RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=True,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        # Statistics in float32 even when activations are bfloat16.
        force_float32_reductions=True,
        # Two-pass variance: E[(x-mean)^2] matches reference implementations in float32.
        use_fast_variance=False,
        name=name,
    )


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
        dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        head_dim = cfg.dim_per_head

        def proj(name: str, heads: int, axis: str) -> Array:
            return nn.DenseGeneral(
                features=(heads, head_dim),
                use_bias=cfg.use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    _init(cfg.init_std), ("embed", axis, "head_dim")
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
        q_BxTxNxH = _constrain(q_BxTxNxH, ("batch", "length", "act_heads", None))
        k_BxTxKxH = _constrain(k_BxTxKxH, ("batch", "length", "act_kv_heads", None))
        v_BxTxKxH = _constrain(v_BxTxKxH, ("batch", "length", "act_kv_heads", None))
        if self.decode:
            out_BxTxNxH = self._cached_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
        else:
            out_BxTxNxH = dot_product_attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, segment_ids_BxT, cfg.attention
            )
        out_BxTxNxH = checkpoint_name(
            _constrain(out_BxTxNxH, ("batch", "length", "act_heads", None)), "attn_out"
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
                _init(out_std), ("heads", "head_dim", "embed")
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


class FeedForward(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Llama): down(act(up(x))) or down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        cfg = self.cfg
        dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)

        def dense(name: str, features: int, axes: tuple[str, str], std: float) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=cfg.use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(_init(std), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
                name=name,
            )

        up_BxTxF = dense("up", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BxTxD)
        if cfg.mlp == Mlp.swiglu:
            gate_BxTxF = dense("gate", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BxTxD)
            hidden_BxTxF = nn.silu(gate_BxTxF) * up_BxTxF
        else:
            # GPT-2 uses the tanh approximation of GELU.
            hidden_BxTxF = nn.gelu(up_BxTxF, approximate=True)
        hidden_BxTxF = _constrain(hidden_BxTxF, ("batch", "length", "act_mlp"))
        hidden_BxTxF = checkpoint_name(hidden_BxTxF, "mlp_hidden")
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return dense("down", cfg.d_model, ("mlp", "embed"), out_std)(hidden_BxTxF)


class Block(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array) -> Array:
        x_BxTxD = x_BxTxD + Attention(self.cfg, self.decode, name="attn")(
            make_norm(self.cfg, "attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT
        )
        x_BxTxD = x_BxTxD + FeedForward(self.cfg, name="mlp")(
            make_norm(self.cfg, "mlp_norm")(x_BxTxD)
        )
        return _constrain(x_BxTxD, ("batch", "length", "act_embed"))


class ScannedBlock(Block):
    """A Block with the (carry, output) signature of nn.scan."""

    def __call__(
        self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array
    ) -> tuple[Array, None]:
        return super().__call__(x_BxTxD, positions_BxT, segment_ids_BxT), None


def _platform() -> str:
    """The platform being compiled for: the enclosing mesh's (AOT compilation for TPU topologies
    runs in a CPU process), else the default backend."""
    mesh = current_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


@jax.custom_vjp
def residual_grad_barrier(x: Array) -> Array:
    """The identity, whose gradient is materialised once where it crosses a block boundary.

    Without it, XLA:CPU fuses the whole chain of residual-gradient additions (a few terms per
    block above) into every consumer of the gradient of each block's input and recomputes it
    there: a cost that grows with the square of the depth (fusions of up to 100 operands, 29% of
    the step of the 6-layer benchmark model; benchmarks/RESULTS.md, "What limited the step").
    The backward pass routes the gradient through a conditional whose branches are both the
    identity: XLA cannot fuse across it, so the gradient is computed once.
    (`lax.optimization_barrier` would say the same, but XLA:CPU removes barriers before fusion.)
    Values are unchanged.
    """
    return x


def _barrier_fwd(x: Array) -> tuple[Array, None]:
    return x, None


def _barrier_bwd(_, g: Array) -> tuple[Array]:
    # A predicate XLA cannot fold; both branches return g unchanged (NaN + 0 is NaN).
    keep = jnp.isnan(g.reshape(-1)[0])
    return (jax.lax.cond(keep, lambda g: g + 0, lambda g: g, g),)


residual_grad_barrier.defvjp(_barrier_fwd, _barrier_bwd)


_REMAT_POLICIES = {
    Remat.full: jax.checkpoint_policies.nothing_saveable,
    Remat.save_dots: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    Remat.save_projections: jax.checkpoint_policies.save_only_these_names(
        "qkv", "attn_out", "mlp_hidden"
    ),
}


def decoder_stack(
    cfg: ModelConfig, x: Array, positions: Array, segment_ids: Array, decode: bool = False
) -> Array:
    """The n_layers blocks: a Python loop, or one nn.scan'd block with stacked parameters."""
    block_cls = ScannedBlock if cfg.scan_layers else Block
    if cfg.remat != Remat.none and not decode:
        # prevent_cse keeps XLA from merging recomputation back into the forward pass; inside
        # scan it is unnecessary and only slows things down.
        block_cls = nn.remat(
            block_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers
        )
    if not cfg.scan_layers:
        for i in range(cfg.n_layers):
            # Only XLA:CPU has shown the problem; a conditional costs more on accelerators.
            if cfg.residual_grad_barrier and not decode and _platform() == "cpu":
                x = residual_grad_barrier(x)
            x = block_cls(cfg, decode, name=f"block_{i}")(x, positions, segment_ids)
        return x
    stack = nn.scan(
        block_cls,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(cfg, decode, name="blocks")(x, positions, segment_ids)
    return x


class Transformer(nn.Module):
    """Decoder-only Transformer language model.

    Args to __call__:
      tokens: int (B, T) token ids.
      positions: int (B, T) position of each token in its document (restart per segment);
        defaults to 0..T-1.
      segment_ids: int (B, T) document id of each token within its row, 0 for padding;
        defaults to all ones (one document).
    Returns float32 logits (B, T, vocab_size). With `decode=True` the attention layers keep a
    key/value cache (see `Attention`); `flaxlm.generate` drives it.
    """

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
    ) -> Array:
        cfg = self.cfg
        dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nn.with_logical_partitioning(_init(cfg.init_std), ("vocab", "embed")),
            name="embed",
        )
        x_BxTxD = embed(tokens)
        if cfg.position == Position.learned:
            pos_table = nn.Embed(
                cfg.max_seq_len,
                cfg.d_model,
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_init=nn.with_logical_partitioning(_init(cfg.init_std), (None, "embed")),
                name="pos_embed",
            )
            x_BxTxD = x_BxTxD + pos_table(positions)
        elif cfg.position == Position.sinusoidal:
            x_BxTxD = x_BxTxD + sinusoidal_encoding(positions, cfg.d_model).astype(dtype)
        x_BxTxD = _constrain(x_BxTxD, ("batch", "length", "act_embed"))

        x_BxTxD = decoder_stack(cfg, x_BxTxD, positions, segment_ids, self.decode)
        x_BxTxD = make_norm(cfg, "final_norm")(x_BxTxD)

        if cfg.tie_embeddings:
            logits_BxTxV = embed.attend(x_BxTxD)
        else:
            logits_BxTxV = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(_init(cfg.init_std), ("embed", "vocab")),
                name="lm_head",
            )(x_BxTxD)
        logits_BxTxV = _constrain(logits_BxTxV, ("batch", "length", "act_vocab"))
        return logits_BxTxV.astype(jnp.float32)
