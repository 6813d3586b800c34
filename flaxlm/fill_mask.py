"""Filling in masked tokens with an encoder (BERT): the likeliest tokens at each [MASK].

The text is tokenized as in training (BOS/[CLS] and EOS/[SEP] when the run adds them); each
literal "[MASK]" in it becomes the tokenizer's mask id (`flaxlm.data.masking`). The model sees
the whole text at once and each mask position gets its top-k tokens with their probabilities.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import Arch, ConfigError
from flaxlm.data.masking import masking_ids
from flaxlm.data.tokenizer import ByteTokenizer, Tokenizer
from flaxlm.train import Trainer

MASK_TEXT = "[MASK]"


def encode_with_masks(text: str, tok: Tokenizer, add_bos: bool, add_eos: bool) -> list[int]:
    """Token ids of text with each literal [MASK] as the mask id."""
    mask_id = masking_ids(tok).mask_id
    if not isinstance(tok, ByteTokenizer):
        # A library tokenizer knows its own [MASK] (a special token) and adds [CLS]/[SEP].
        return tok.encode(text, add_bos=add_bos, add_eos=add_eos)
    ids: list[int] = [tok.bos_id] if add_bos else []
    for i, piece in enumerate(text.split(MASK_TEXT)):
        ids += ([mask_id] if i else []) + tok.encode(piece)
    return ids + ([tok.eos_id] if add_eos else [])


def fill_mask(trainer: Trainer, params, text: str, tok: Tokenizer, top_k: int = 5) -> list[dict]:
    """For each mask position of text, in order: its position and the top_k predictions
    (token text, id, probability), likeliest first."""
    cfg = trainer.cfg
    if cfg.model.arch != Arch.encoder:
        raise ConfigError(
            f"model.arch={cfg.model.arch}: fill-mask needs an encoder trained with "
            "train.objective=mlm (a decoder continues text: use `flaxlm generate`)"
        )
    if top_k < 1:
        raise ConfigError(f"--top-k={top_k} must be >= 1")
    ids = encode_with_masks(text, tok, cfg.data.add_bos, cfg.data.add_eos)
    mask_id = masking_ids(tok).mask_id
    where = [i for i, t in enumerate(ids) if t == mask_id]
    if not where:
        raise ConfigError(f"--text has no {MASK_TEXT}: mark the tokens to predict with {MASK_TEXT}")
    if len(ids) > cfg.model.max_seq_len:
        raise ConfigError(
            f"--text is {len(ids)} tokens long; the model's context (model.max_seq_len) is "
            f"{cfg.model.max_seq_len}: shorten it"
        )
    tokens_1xT = jnp.asarray([ids], jnp.int32)
    positions_1xT = jnp.arange(len(ids), dtype=jnp.int32)[None]
    with trainer.context():
        logits_1xTxV = trainer.model.apply(
            {"params": params}, tokens_1xT, positions_1xT, jnp.ones_like(tokens_1xT)
        )
    probs_MxV = np.asarray(jax.nn.softmax(logits_1xTxV[0, jnp.asarray(where)], axis=-1))
    k = min(top_k, probs_MxV.shape[-1])
    results = []
    for position, probs_V in zip(where, probs_MxV, strict=True):
        best = np.argsort(-probs_V, kind="stable")[:k]
        predictions: list[dict[str, Any]] = [
            {"token": tok.decode([int(i)]), "id": int(i), "probability": float(probs_V[i])}
            for i in best
        ]
        results.append({"position": position, "predictions": predictions})
    return results
