"""The training objective: a model's per-token losses on a batch and their sums.

`forward_losses` applies the whole model and returns its logits with the losses;
`chunked_forward_losses` stops at the final hidden states and applies the output head a chunk of
positions at a time (`model.logit_chunks`, flaxlm/output_head.py); `batch_losses` picks one of
them as the model says; `loss_sums` adds the z-loss and the routers' losses and sums everything
over the batch, so that micro-batches add up exactly (`flaxlm.train`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from flaxlm.config import Arch
from flaxlm.losses import (
    correct_predictions,
    masked_losses,
    next_token_weights,
    next_tokens,
    token_losses,
)
from flaxlm.model import Transformer
from flaxlm.moe import MOE_COLLECTION, router_losses
from flaxlm.output_head import chunked_cross_entropy, head_kernel

Batch = dict[str, jax.Array]


def _apply(
    params, model: Transformer, batch: Batch, dropout_key: jax.Array | None, **kwargs
) -> tuple[jax.Array, dict]:
    """The model on a batch (dropout on with a dropout_key), with the routers' statistics."""
    rngs = {} if dropout_key is None else {"dropout": dropout_key}
    return model.apply(
        {"params": params},
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        rngs=rngs,
        mutable=[MOE_COLLECTION],
        **kwargs,
    )


def forward_losses(
    params, model: Transformer, batch: Batch, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """The model's logits_BxTxV on a batch, with its per-token losses, their weights and the
    router statistics of mixture-of-experts layers (their own collection; {} for dense models).
    A decoder's losses are those of the next tokens (B x T-1), an encoder's those of the masked
    tokens (B x T, weight 0 elsewhere).

    With a dropout_key the model's dropout is on (training); without, it is deterministic.
    """
    logits_BxTxV, stats = _apply(params, model, batch, dropout_key)
    if model.cfg.arch == Arch.encoder:
        return logits_BxTxV, *masked_losses(logits_BxTxV, batch), stats
    return logits_BxTxV, *token_losses(logits_BxTxV, batch), stats


def chunked_forward_losses(
    params, model: Transformer, batch: Batch, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """A decoder's next-token losses_BxTm1, weights_BxTm1, log-partitions log_z_BxTm1 and
    router statistics, the head applied model.logit_chunks chunks of positions at a time
    (`flaxlm.output_head`): the same values as forward_losses without all the logits at once."""
    cfg = model.cfg
    x_BxTxD, stats = _apply(params, model, batch, dropout_key, return_hidden=True)
    losses_BxT, log_z_BxT = chunked_cross_entropy(
        cfg, x_BxTxD, head_kernel(cfg, params), next_tokens(batch), cfg.logit_chunks
    )
    return losses_BxT[:, :-1], next_token_weights(batch), log_z_BxT[:, :-1], stats


class BatchLosses(NamedTuple):
    """A batch's per-token losses, their weights and the routers' statistics; the logits when
    they were computed whole, else (chunked) the log-partitions the z-loss needs."""

    losses: jax.Array
    weights: jax.Array
    stats: dict
    logits: jax.Array | None = None
    log_z: jax.Array | None = None

    def log_partitions(self) -> jax.Array:
        """log_z at the positions of the losses: the first T-1 (decoders) or all T (encoders)."""
        if self.log_z is not None:
            return self.log_z
        return jax.nn.logsumexp(self.logits, axis=-1)[:, : self.weights.shape[1]]


def batch_losses(
    params, model: Transformer, batch: Batch, dropout_key: jax.Array | None = None
) -> BatchLosses:
    """forward_losses, or chunked_forward_losses where the model says (model.logit_chunks)."""
    if model.cfg.logit_chunks > 1:
        losses, weights, log_z, stats = chunked_forward_losses(params, model, batch, dropout_key)
        return BatchLosses(losses, weights, stats, log_z=log_z)
    logits, losses, weights, stats = forward_losses(params, model, batch, dropout_key)
    return BatchLosses(losses, weights, stats, logits=logits)


def loss_sums(
    params, model: Transformer, batch: Batch, z_loss: float, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective summed (not averaged) over the batch's predicted tokens.

    Sums make micro-batches add up exactly to the whole batch; the caller divides by the total
    token count once.
    """
    out = batch_losses(params, model, batch, dropout_key)
    nats = (out.losses * out.weights).sum()
    aux = {"nats": nats, "tokens": out.weights.sum()}
    if model.cfg.arch == Arch.encoder:  # masked-LM accuracy, summed like the loss
        aux["correct"] = correct_predictions(out.logits, batch, out.weights)
    objective = nats
    if model.cfg.moe.enabled:
        extra, moe_sums = router_losses(out.stats, model.cfg.moe, aux["tokens"])
        objective = objective + extra
        aux.update(moe_sums)
    if z_loss:
        z = (out.log_partitions() ** 2 * out.weights).sum()
        objective = objective + z_loss * z
        aux["z"] = z
    return objective, aux
