"""The language-modelling losses: next-token cross entropy per token (decoders) or the cross
entropy of the masked tokens alone (encoders), and their weights.

Shape letters as in `flaxlm.model`; `flaxlm.train` sums these into the training objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]


def token_losses(logits_BxTxV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-token next-token cross entropy losses_BxTm1 and their weights (Tm1 = T - 1; the
    shape letters are those of `flaxlm.model`).

    Position t predicts token t+1 when both lie in the same (non-padding) segment, so a packed
    row never trains on predicting the first token of the next document.
    """
    # The loss at every position (the last one's target is a dummy), then the first T-1 losses:
    # slicing the (B, T) losses rather than the (B, T, V) logits spares a copy of the logits
    # and, in the backward pass, a padded copy of their gradient.
    losses_BxT = cross_entropy(logits_BxTxV, next_tokens(batch))
    return losses_BxT[:, :-1], next_token_weights(batch)


def next_tokens(batch: Batch) -> jax.Array:
    """targets_BxT: the token after each position; the last position's target is a dummy
    (its own token) whose loss is never counted."""
    tokens_BxT = batch["tokens"]
    return jnp.concatenate([tokens_BxT[:, 1:], tokens_BxT[:, -1:]], axis=1)


def next_token_weights(batch: Batch) -> jax.Array:
    """weights_BxTm1: 1 where position t's next token is in its own (non-padding) segment."""
    segments_BxT = batch["segment_ids"]
    same_BxTm1 = segments_BxT[:, 1:] == segments_BxT[:, :-1]
    return (same_BxTm1 & (segments_BxT[:, 1:] != 0)).astype(jnp.float32)


def masked_losses(logits_BxTxV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Masked-LM cross entropy losses_BxT against the original tokens (`labels`), weighted by
    `label_weights`: 1 at the positions the pipeline chose (`flaxlm.data.masking`), 0 elsewhere,
    so that only they count."""
    losses_BxT = cross_entropy(logits_BxTxV, batch["labels"])
    return losses_BxT, batch["label_weights"].astype(jnp.float32)


def correct_predictions(logits_BxTxV: jax.Array, batch: Batch, weights_BxT: jax.Array) -> jax.Array:
    """How many weighted positions have the label as their most likely token (a float sum)."""
    hits_BxT = jnp.argmax(logits_BxTxV, axis=-1) == batch["labels"]
    return (hits_BxT.astype(jnp.float32) * weights_BxT).sum()


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """losses_BxT = logsumexp(logits) - logits[target], in float32 whatever the logits' dtype."""
    return cross_entropy_and_log_z(logits_BxTxV, targets_BxT)[0]


def cross_entropy_and_log_z(
    logits_BxTxV: jax.Array, targets_BxT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(losses_BxT, log_z_BxT): the cross entropy and the log-partition logsumexp(logits) that
    it subtracts the target's logit from (the z-loss penalises its square).

    Both terms are reductions over the vocabulary (the target's logit is picked by comparing
    with an iota, not gathered), so XLA fuses the upcast into them and never writes float32
    logits; their gradient, softmax - one_hot, is elementwise and fuses as well. A gather would
    need the float32 logits whole in memory.
    """
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    vocab_V = jnp.arange(logits_BxTxV.shape[-1], dtype=targets_BxT.dtype)
    is_target_BxTxV = vocab_V == targets_BxT[..., None]
    target_logit_BxT = jnp.sum(jnp.where(is_target_BxTxV, logits_BxTxV, 0.0), axis=-1)
    return log_z_BxT - target_logit_BxT, log_z_BxT
