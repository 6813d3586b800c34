"""The output head of a decoder: the vocabulary projection, and the loss computed in chunks of
positions so that the logits of a whole sequence never exist at once.

At a large vocabulary the logits dominate a step's memory: Llama 3 (128,256 tokens) at 8K
positions has 2 GiB of bfloat16 logits per sequence, and as many again for their gradient.
With `model.logit_chunks=C` the loss is a `lax.scan` over C chunks of positions: the forward
pass keeps only each position's loss and log-partition, and the backward pass (a second scan,
written out in a custom VJP) recomputes one chunk's logits at a time. The FLOPs are those of the
unchunked head plus one more forward projection (the recomputation), the memory about 1/C of
its logits. The weight is gathered over its FSDP shards once, before both loops; the
gradient of each chunk is reduce-scattered onto those shards and summed in float32.

Chunks are strided (chunk c holds positions c, c + C, c + 2C, ...), so that with context
parallelism every device holds an equal share of every chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.config import ModelConfig
from flaxlm.layers import dtype_of, normal_init
from flaxlm.losses import cross_entropy_and_log_z
from flaxlm.mesh import logical_constraint as constrain

Array = jax.Array

# XLA's cost analysis counts a loop's body once; flaxlm.step_cost traces the chunks unrolled.
_UNROLL = contextvars.ContextVar("flaxlm_unroll_logit_chunks", default=False)


@contextlib.contextmanager
def unrolled_chunks() -> Iterator[None]:
    """Within it, chunked_cross_entropy traces its chunks one after the other, without a loop
    (the same operations: for the cost analysis of a step, not for running it)."""
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


class LMHead(nn.Module):
    """The untied output projection's kernel_DxV (the parameter `lm_head/kernel`, as an
    `nn.Dense` would name it); `head_logits` applies it."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> Array:
        cfg = self.cfg
        return self.param(
            "kernel",
            nn.with_logical_partitioning(normal_init(cfg.init_std), ("embed", "vocab")),
            (cfg.d_model, cfg.vocab_size),
            dtype_of(cfg.param_dtype),
        )


def head_logits(cfg: ModelConfig, x_BxTxD: Array, w_DxV: Array) -> Array:
    """float32 logits_BxTxV = x @ w in the compute dtype, soft-capped where the model says."""
    dtype = dtype_of(cfg.dtype)
    logits_BxTxV = jnp.dot(x_BxTxD.astype(dtype), w_DxV.astype(dtype))
    logits_BxTxV = constrain(logits_BxTxV, ("batch", "length", "act_vocab"))
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
        cap = cfg.final_logit_softcap
        logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
    return logits_BxTxV


def gather_head(cfg: ModelConfig, w_DxV: Array) -> Array:
    """w in the compute dtype, gathered over its FSDP (`embed`) shards before it meets the
    hidden states; in the backward pass its gradient is reduce-scattered onto those shards.

    The gradient of w is computed whole on every device (its share of the batch) and then
    reduce-scattered in one collective (which libtpu for v5p runs as an all-reduce and a
    slice: twice the bytes on the wire). Left to itself, XLA computes that gradient as a
    collective matmul (a loop that passes shards of it around the ring), and the loop needs
    the gradient of the logits in memory as its operand: 2 GiB per 8K-token Llama-3 sequence,
    where otherwise XLA fuses the softmax's backward into both matmuls and never writes it.
    Inside the chunked loss the gather also keeps XLA from gathering w once per chunk.
    """
    return _gathered(w_DxV.astype(dtype_of(cfg.dtype)))


@jax.custom_vjp
def _gathered(w_DxV: Array) -> Array:
    return constrain(w_DxV, (None, "vocab"))


def _gathered_fwd(w_DxV: Array) -> tuple[Array, None]:
    return _gathered(w_DxV), None


def _gathered_bwd(_, g_w_DxV: Array) -> tuple[Array]:
    # Whole first (each device's partial sum, as the matmul made it), then onto the shards,
    # where the barrier keeps it: XLA would otherwise slice the whole gradient only inside
    # the optimizer's update, at the end of the step. Constrained straight to the shards,
    # the matmul itself would become the collective matmul.
    g_w_DxV = constrain(g_w_DxV, (None, "vocab"))
    return (jax.lax.optimization_barrier(constrain(g_w_DxV, ("embed", "vocab"))),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def head_kernel(cfg: ModelConfig, params: dict) -> Array:
    """w_DxV of a decoder's parameters: the transposed embedding table when they are tied."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def _chunked(a_BxTx_: Array, chunks: int) -> Array:
    """a_CxBxKx_: strided chunks of positions (chunk c holds positions c, c + C, ...)."""
    B, T = a_BxTx_.shape[:2]
    return jnp.moveaxis(a_BxTx_.reshape(B, T // chunks, chunks, *a_BxTx_.shape[2:]), 2, 0)


def _unchunked(a_CxBxKx_: Array) -> Array:
    """The inverse of _chunked: a_BxTx_ in the positions' order."""
    C, B, K = a_CxBxKx_.shape[:3]
    return jnp.moveaxis(a_CxBxKx_, 0, 2).reshape(B, K * C, *a_CxBxKx_.shape[3:])


def _chunk_loss(cfg: ModelConfig, x_BxKxD: Array, w_DxV: Array, targets_BxK: Array):
    x_BxKxD = constrain(x_BxKxD, ("batch", "length", "act_embed"))
    return cross_entropy_and_log_z(head_logits(cfg, x_BxKxD, w_DxV), targets_BxK)


def chunked_cross_entropy(
    cfg: ModelConfig, x_BxTxD: Array, w_DxV: Array, targets_BxT: Array, chunks: int
) -> tuple[Array, Array]:
    """(losses_BxT, log_z_BxT) of the logits head_logits(x, w) against targets, computed
    `chunks` strided chunks of positions at a time (see the module docstring).

    The backward pass is written out: it recomputes each chunk's logits, and adds each chunk's
    gradient of w, reduce-scattered onto w's shards, into a float32 sum (XLA's own transpose of
    the loop would sum them in the compute dtype).
    """
    # `unroll` is an argument of the custom VJP, not read inside it: JAX caches the traces of
    # custom-VJP rules by their static arguments.
    return _chunked_ce(cfg, x_BxTxD, w_DxV, targets_BxT, chunks, _UNROLL.get())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _chunked_ce(cfg: ModelConfig, x_BxTxD, w_DxV, targets_BxT, chunks: int, unroll: bool):
    return _chunked_fwd(cfg, x_BxTxD, w_DxV, targets_BxT, chunks, unroll)[0]


def _chunked_fwd(cfg: ModelConfig, x_BxTxD, w_DxV, targets_BxT, chunks: int, unroll: bool):
    w_gathered_DxV = gather_head(cfg, w_DxV)

    def chunk(_, xs: tuple[Array, Array]) -> tuple[None, tuple[Array, Array]]:
        x_BxKxD, targets_BxK = xs
        return None, _chunk_loss(cfg, x_BxKxD, w_gathered_DxV, targets_BxK)

    xs = (_chunked(x_BxTxD, chunks), _chunked(targets_BxT, chunks))
    _, (losses_CxBxK, log_z_CxBxK) = jax.lax.scan(chunk, None, xs, unroll=unroll)
    out = (_unchunked(losses_CxBxK), _unchunked(log_z_CxBxK))
    return out, (x_BxTxD, w_DxV, w_gathered_DxV, targets_BxT)


def _chunked_bwd(cfg: ModelConfig, chunks: int, unroll: bool, residuals, cotangents):
    x_BxTxD, w_DxV, w_gathered_DxV, targets_BxT = residuals
    g_losses_BxT, g_log_z_BxT = cotangents

    def chunk(g_w_DxV: Array, xs) -> tuple[Array, Array]:
        if unroll:
            # Unrolled, the recomputed logits equal the forward pass's and XLA would merge the
            # two (common subexpressions); the loops keep them apart.
            xs = jax.lax.optimization_barrier(xs)
        x_BxKxD, targets_BxK, g_losses_BxK, g_log_z_BxK = xs
        _, vjp = jax.vjp(lambda x, w: _chunk_loss(cfg, x, w, targets_BxK), x_BxKxD, w_gathered_DxV)
        g_x_BxKxD, g_w_chunk_DxV = vjp((g_losses_BxK, g_log_z_BxK))
        g_w_chunk_DxV = constrain(g_w_chunk_DxV, ("embed", "vocab")).astype(g_w_DxV.dtype)
        return g_w_DxV + g_w_chunk_DxV, g_x_BxKxD

    g_w_DxV = constrain(jnp.zeros(w_DxV.shape, jnp.float32), ("embed", "vocab"))
    xs = (x_BxTxD, targets_BxT, g_losses_BxT, g_log_z_BxT)
    g_w_DxV, g_x_CxBxKxD = jax.lax.scan(
        chunk, g_w_DxV, tuple(_chunked(a, chunks) for a in xs), unroll=unroll
    )
    # Integer targets have no gradient.
    return _unchunked(g_x_CxBxKxD).astype(x_BxTxD.dtype), g_w_DxV.astype(w_DxV.dtype), None


_chunked_ce.defvjp(_chunked_fwd, _chunked_bwd)
