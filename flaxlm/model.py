"""The decoder-only Transformer (Flax linen): parameters in, logits out.

One module covers both families through `ModelConfig`:

- GPT-2: LayerNorm, GELU MLP, learned absolute positions, biases, tied input/output embeddings.
- Llama: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases, untied output.
- The classic sinusoidal encoding of Vaswani et al. (x + PE(p)) is a third position choice.
- BERT (model.arch=encoder): bidirectional attention, post-norm blocks, token-type embeddings
  and a masked-LM head (`flaxlm.encoder`).
- Options on the Llama shape give Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k
  norms) and Gemma 2 (GeGLU, (1 + scale) norms, post-norms, embedding scaling, soft-capped
  logits, alternating local/global layers).

Dropout (embeddings, attention probabilities, residual branches) is on only when `apply` gets a
"dropout" RNG, which only the train step passes.

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

from flaxlm.config import Arch, ModelConfig, Position, Remat, is_sparse_layer
from flaxlm.context_parallel import inverse, load_balanced_order
from flaxlm.encoder import encoder_embeddings, mlm_logits
from flaxlm.layers import (
    FeedForward,
    constrain,
    dropout,
    dtype_of,
    embedding,
    make_norm,
)
from flaxlm.mesh import current_platform
from flaxlm.moe import MOE_COLLECTION, MoeFeedForward
from flaxlm.output_head import LMHead, gather_head, head_logits
from flaxlm.positions import sinusoidal_encoding
from flaxlm.self_attention import Attention

Array = jax.Array


class Block(nn.Module):
    """Pre-norm residual block: attention then MLP (routed experts when `sparse`)."""

    cfg: ModelConfig
    decode: bool = False
    # This layer's sliding window (None: the whole causal prefix); see layer_window.
    window: int | None = None
    sparse: bool = False  # a mixture-of-experts feed-forward block instead of the dense one

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array) -> Array:
        cfg = self.cfg
        attn = Attention(cfg, self.decode, self.window, name="attn")
        h_BxTxD = attn(make_norm(cfg, "attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT)
        if cfg.post_norms:  # Gemma normalises each branch's output too
            h_BxTxD = make_norm(cfg, "post_attn_norm")(h_BxTxD)
        x_BxTxD = x_BxTxD + dropout(self, cfg.dropout_residual, h_BxTxD)
        mlp = MoeFeedForward if self.sparse else FeedForward
        h_BxTxD = mlp(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_BxTxD))
        if cfg.post_norms:
            h_BxTxD = make_norm(cfg, "post_mlp_norm")(h_BxTxD)
        x_BxTxD = x_BxTxD + dropout(self, cfg.dropout_residual, h_BxTxD)
        return constrain(x_BxTxD, ("batch", "length", "act_embed"))


class PostNormBlock(Block):
    """Post-norm residual block of an encoder (BERT): Norm(x + Attn(x)), then Norm(x + MLP(x))."""

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array) -> Array:
        cfg = self.cfg
        h_BxTxD = Attention(cfg, name="attn")(x_BxTxD, positions_BxT, segment_ids_BxT)
        x_BxTxD = make_norm(cfg, "attn_norm")(
            x_BxTxD + dropout(self, cfg.dropout_residual, h_BxTxD)
        )
        h_BxTxD = FeedForward(cfg, name="mlp")(x_BxTxD)
        x_BxTxD = make_norm(cfg, "mlp_norm")(x_BxTxD + dropout(self, cfg.dropout_residual, h_BxTxD))
        return constrain(x_BxTxD, ("batch", "length", "act_embed"))


def layer_window(cfg: ModelConfig, layer: int) -> int | None:
    """The sliding window of layer `layer`: cfg.sliding_window, except every global_every-th
    layer, which sees the whole prefix (Gemma 2 alternates local and global layers)."""
    if cfg.global_every and (layer + 1) % cfg.global_every == 0:
        return None
    return cfg.sliding_window


class ScannedBlock(Block):
    """A Block with the (carry, output) signature of nn.scan."""

    def __call__(
        self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array
    ) -> tuple[Array, None]:
        return super().__call__(x_BxTxD, positions_BxT, segment_ids_BxT), None


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
    if cfg.arch == Arch.encoder:  # validation keeps encoders unscanned
        block_cls = PostNormBlock
    if cfg.remat != Remat.none and not decode:
        # prevent_cse keeps XLA from merging recomputation back into the forward pass; inside
        # scan it is unnecessary and only slows things down.
        block_cls = nn.remat(
            block_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers
        )
    if not cfg.scan_layers:
        for i in range(cfg.n_layers):
            # Only XLA:CPU has shown the problem; a conditional costs more on accelerators.
            if cfg.residual_grad_barrier and not decode and current_platform() == "cpu":
                x = residual_grad_barrier(x)
            sparse = is_sparse_layer(cfg.moe, i)
            x = block_cls(cfg, decode, layer_window(cfg, i), sparse, name=f"block_{i}")(
                x, positions, segment_ids
            )
        return x
    for name, length, sparse in _scan_groups(cfg):
        stack = nn.scan(
            block_cls,
            variable_axes={"params": 0, "cache": 0, MOE_COLLECTION: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=length,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(cfg, decode, cfg.sliding_window, sparse, name=name)(x, positions, segment_ids)
    return x


def _scan_groups(cfg: ModelConfig) -> list[tuple[str, int, bool]]:
    """(name, layers, sparse) of each scanned stack: one, or the dense first layers of a
    mixture-of-experts model and then its sparse layers."""
    dense = cfg.moe.first_dense_layers if cfg.moe.enabled else 0
    if not dense:
        return [("blocks", cfg.n_layers, cfg.moe.enabled)]
    return [("dense_blocks", dense, False), ("blocks", cfg.n_layers - dense, True)]


class Transformer(nn.Module):
    """Transformer language model: a decoder (next-token logits) or, with model.arch=encoder,
    a BERT encoder (masked-LM logits at every position).

    Args to __call__:
      tokens: int (B, T) token ids.
      positions: int (B, T) position of each token in its document (restart per segment);
        defaults to 0..T-1.
      segment_ids: int (B, T) document id of each token within its row, 0 for padding;
        defaults to all ones (one document).
      token_types: int (B, T) token-type (segment A/B) ids of an encoder; defaults to 0.
      return_hidden: a decoder's final (normalised) hidden states x_BxTxD instead of its
        logits, for a loss that applies the head itself (`flaxlm.output_head`).
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
        token_types: Array | None = None,
        return_hidden: bool = False,
    ) -> Array:
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if cfg.arch == Arch.encoder:
            x_BxTxD, embed = encoder_embeddings(self, cfg, tokens, positions, token_types)
            x_BxTxD = decoder_stack(cfg, x_BxTxD, positions, segment_ids)
            return mlm_logits(self, cfg, x_BxTxD, embed)

        # Context parallelism: lay each row out for the context shards (a no-op without them).
        order_T = None if self.decode else load_balanced_order(tokens.shape[1])
        if order_T is not None:
            tokens, positions, segment_ids = (
                a[:, order_T] for a in (tokens, positions, segment_ids)
            )

        embed = embedding(cfg, cfg.vocab_size, "vocab", "embed")
        x_BxTxD = embed(tokens)
        if cfg.embed_scale:  # Gemma: sqrt(d_model), rounded to the compute dtype as in Gemma
            x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        if cfg.position == Position.learned:
            pos_table = embedding(cfg, cfg.max_seq_len, None, "pos_embed")
            x_BxTxD = x_BxTxD + pos_table(positions)
        elif cfg.position == Position.sinusoidal:
            x_BxTxD = x_BxTxD + sinusoidal_encoding(positions, cfg.d_model).astype(dtype)
        x_BxTxD = dropout(self, cfg.dropout_embed, x_BxTxD)
        x_BxTxD = constrain(x_BxTxD, ("batch", "length", "act_embed"))

        x_BxTxD = decoder_stack(cfg, x_BxTxD, positions, segment_ids, self.decode)
        if order_T is not None:  # back to the row's own order
            x_BxTxD = constrain(x_BxTxD[:, inverse(order_T)], ("batch", "length", "act_embed"))
        x_BxTxD = make_norm(cfg, "final_norm")(x_BxTxD)

        if return_hidden:
            return x_BxTxD
        w_DxV = embed.embedding.T if cfg.tie_embeddings else LMHead(cfg, name="lm_head")()
        return head_logits(cfg, x_BxTxD, gather_head(cfg, w_DxV))
