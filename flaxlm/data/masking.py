"""Masked-LM masking in the tf.data pipeline (BERT's recipe), seeded and resumable.

Of the tokens of a batch that are neither padding nor special (BOS/[CLS], EOS/[SEP], PAD,
[MASK]), each is chosen with probability `data.mask_rate` (BERT: 15%); a chosen token becomes
[MASK] with probability 0.8, a random token with 0.1, and stays itself with 0.1. The batch then
carries `tokens` (the model's input), `labels` (the original tokens) and `label_weights` (1 at
the chosen positions): loss and accuracy count those alone.

Every draw is a stateless random op keyed on (seed, batch counter): the counter is the index of
the batch in its stream (`Dataset.enumerate`), which the iterator checkpoint saves, so two
iterators built alike, or one restored from a saved position, draw the same masks.

Ids: the byte tokenizer's [MASK] is `BYTE_MASK_ID` (259, just past its BOS, EOS and PAD, which
play [CLS], [SEP] and [PAD]); random replacements are bytes. A Hugging Face tokenizer brings
its own [MASK] (or <mask>) and special tokens; random replacements range over its vocabulary.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from flaxlm.config import BYTE_MASK_ID, ConfigError
from flaxlm.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

# Of the chosen tokens: below MASK_SHARE become [MASK], below MASK_SHARE + RANDOM_SHARE a random
# token, the rest stay.
MASK_SHARE = 0.8
RANDOM_SHARE = 0.1


@dataclasses.dataclass(frozen=True)
class MaskingIds:
    mask_id: int
    special_ids: tuple[int, ...]  # never chosen
    random_ids: int  # random replacements are drawn from [0, random_ids)


def masking_ids(tok: Tokenizer) -> MaskingIds:
    """The [MASK] id, the special ids and the range of random replacements of a tokenizer."""
    specials = {i for i in (tok.bos_id, tok.eos_id) if i is not None}
    if isinstance(tok, ByteTokenizer):
        return MaskingIds(BYTE_MASK_ID, tuple(sorted(specials | {tok.pad_id, BYTE_MASK_ID})), 256)
    mask_id = None
    if isinstance(tok, HFTokenizer):
        added = tok._tok.get_added_tokens_decoder()
        specials |= {i for i, t in added.items() if t.special}
        for name in ("[MASK]", "<mask>"):
            mask_id = tok._tok.token_to_id(name) if mask_id is None else mask_id
    if mask_id is None:
        raise ConfigError(
            "train.objective=mlm needs a [MASK] token, and this tokenizer (data.tokenizer) has "
            "neither [MASK] nor <mask>; use data.tokenizer=byte or a BERT-style tokenizer.json"
        )
    return MaskingIds(mask_id, tuple(sorted(specials | {mask_id})), tok.vocab_size)


def mask_batch(
    batch: dict[str, tf.Tensor], counter: tf.Tensor, seed: int, rate: float, ids: MaskingIds
) -> dict[str, tf.Tensor]:
    """One batch masked: draws keyed on (seed, counter) alone."""
    tokens = batch["tokens"]
    shape = tf.shape(tokens)
    counter = tf.cast(counter, tf.int64)

    def key(draw: int) -> tf.Tensor:  # one independent stream per draw
        return tf.stack([tf.constant(seed * 4 + draw, tf.int64), counter])

    eligible = batch["segment_ids"] != 0
    for special in ids.special_ids:
        eligible &= tokens != special
    chosen = eligible & (tf.random.stateless_uniform(shape, key(0)) < rate)
    how = tf.random.stateless_uniform(shape, key(1))
    random_tokens = tf.random.stateless_uniform(
        shape, key(2), minval=0, maxval=ids.random_ids, dtype=tf.int32
    )
    inputs = tf.where(chosen & (how < MASK_SHARE), tf.cast(ids.mask_id, tokens.dtype), tokens)
    replace = chosen & (how >= MASK_SHARE) & (how < MASK_SHARE + RANDOM_SHARE)
    inputs = tf.where(replace, tf.cast(random_tokens, tokens.dtype), inputs)
    return {
        **batch,
        "tokens": inputs,
        "labels": tokens,
        "label_weights": tf.cast(chosen, tf.int32),
    }


def mask_dataset(ds: tf.data.Dataset, tok: Tokenizer, rate: float, seed: int) -> tf.data.Dataset:
    """Each batch of `ds` masked, keyed on (seed, its index in ds)."""
    ids = masking_ids(tok)
    return ds.enumerate().map(
        lambda i, batch: mask_batch(batch, i, seed, rate, ids),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def mask_statistics(batch: dict[str, np.ndarray], mask_id: int) -> dict[str, float]:
    """Of the chosen positions of a host batch: the share chosen among real tokens, and the
    shares turned to [MASK], replaced and kept (for tests and a quick look at a pipeline)."""
    chosen = batch["label_weights"].astype(bool)
    real = batch["segment_ids"] != 0
    inputs, labels = batch["tokens"][chosen], batch["labels"][chosen]
    masked = inputs == mask_id
    kept = (inputs == labels) & ~masked
    n = max(int(chosen.sum()), 1)
    return {
        "chosen": float(chosen.sum() / max(real.sum(), 1)),
        "masked": float(masked.sum() / n),
        "kept": float(kept.sum() / n),
        "replaced": float((~masked & ~kept).sum() / n),
    }
