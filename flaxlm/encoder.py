"""The encoder family (BERT): its embeddings and its masked-LM head.

`flaxlm.model.Transformer` builds an encoder when model.arch=encoder: these embeddings (token +
learned position + token type, then LayerNorm and dropout), the post-norm blocks of
`flaxlm.model.PostNormBlock` with bidirectional attention within each segment (segment 0 is
padding, never attended to), and the masked-LM head: dense, GELU, LayerNorm, then the word
embeddings transposed (tied) plus a bias of its own. Parameter names follow Hugging Face's
`BertForMaskedLM` (`flaxlm.convert.bert` maps them). There is no pooler or next-sentence head:
pretraining here is masked-LM only.

These functions run inside `Transformer`'s compact `__call__`: the modules they create are its
own, so an encoder's parameters sit at the top level like a decoder's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.config import Mlp, ModelConfig
from flaxlm.layers import constrain, dropout, dtype_of, embedding, make_norm, normal_init

Array = jax.Array


def encoder_embeddings(
    module: nn.Module,
    cfg: ModelConfig,
    tokens_BxT: Array,
    positions_BxT: Array,
    token_types_BxT: Array | None,
) -> tuple[Array, nn.Embed]:
    """x_BxTxD = Dropout(LayerNorm(word + type + position)), and the word table (the head
    reuses it). Token types default to 0 (one sentence per segment, as in pretraining here)."""
    if token_types_BxT is None:
        token_types_BxT = jnp.zeros_like(tokens_BxT)
    embed = embedding(cfg, cfg.vocab_size, "vocab", "embed")
    x_BxTxD = embed(tokens_BxT)
    x_BxTxD = x_BxTxD + embedding(cfg, cfg.type_vocab_size, None, "type_embed")(token_types_BxT)
    x_BxTxD = x_BxTxD + embedding(cfg, cfg.max_seq_len, None, "pos_embed")(positions_BxT)
    x_BxTxD = make_norm(cfg, "embed_norm")(x_BxTxD)
    x_BxTxD = dropout(module, cfg.dropout_embed, x_BxTxD)
    return constrain(x_BxTxD, ("batch", "length", "act_embed")), embed


def mlm_logits(module: nn.Module, cfg: ModelConfig, x_BxTxD: Array, embed: nn.Embed) -> Array:
    """The masked-LM head: logits_BxTxV = LayerNorm(GELU(Dense(x))) @ word_embeddings^T + bias,
    in float32."""
    dense = nn.Dense(
        cfg.d_model,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(normal_init(cfg.init_std), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        name="mlm_dense",
    )
    h_BxTxD = nn.gelu(dense(x_BxTxD), approximate=cfg.mlp != Mlp.gelu_exact)
    h_BxTxD = make_norm(cfg, "mlm_norm")(h_BxTxD)
    bias_V = module.param(
        "mlm_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
        (cfg.vocab_size,),
        dtype_of(cfg.param_dtype),
    )
    logits_BxTxV = embed.attend(h_BxTxD) + bias_V.astype(h_BxTxD.dtype)
    logits_BxTxV = constrain(logits_BxTxV, ("batch", "length", "act_vocab"))
    return logits_BxTxV.astype(jnp.float32)
