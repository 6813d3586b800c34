"""Gemma 2: Hugging Face `Gemma2ForCausalLM` tensors and config.json to flaxlm and back.

The Llama layer layout plus a post-norm after each branch (`post_attention_layernorm` and
`post_feedforward_layernorm`; the pre-MLP norm is `pre_feedforward_layernorm`), GeGLU, RMSNorm
scales stored as offsets from one, embeddings scaled by sqrt(d_model), soft-capped attention and
output logits, and a sliding window on every other layer (layers 0, 2, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxlm.config import ConfigError, ModelConfig
from flaxlm.convert import llama

MODEL_TYPES = ("gemma2",)
STRIP_PREFIX = ""
EXPORT_PREFIX = ""
layer_prefix = llama.layer_prefix
_NORMS = {  # flaxlm name: Hugging Face name
    "attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}


def overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"Gemma 2 activation {hf['hidden_activation']!r} is not supported")
    if hf.get("attention_bias"):
        raise ConfigError("Gemma 2 checkpoints with attention biases are not supported")
    n = hf["num_hidden_layers"]
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if hf.get("layer_types") not in (None, expected):
        raise ConfigError("Gemma 2 layer_types other than alternating local/global")
    out = llama.overrides_from_hf({**hf, "model_type": "llama"})
    out.update(
        mlp="geglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=hf["sliding_window"],
        global_every=2,
        norm_scale_offset=True,
        embed_scale=True,
        post_norms=True,
        query_scale=float(hf["query_pre_attn_scalar"]),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
    )
    return out


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.global_every != 2 or not (cfg.norm_scale_offset and cfg.embed_scale):
        raise ConfigError(
            "a Gemma 2 export needs model.global_every=2, norm_scale_offset and embed_scale"
        )
    out = llama.hf_config(dataclasses.replace(cfg, sliding_window=None))
    n = cfg.n_layers
    out.update(
        architectures=["Gemma2ForCausalLM"],
        model_type="gemma2",
        hidden_activation="gelu_pytorch_tanh",
        # transformers insists on an int here.
        query_pre_attn_scalar=int(cfg.query_scale or cfg.dim_per_head),
        sliding_window=cfg.sliding_window,
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
    )
    for key in ("hidden_act", "mlp_bias"):
        out.pop(key)
    return out


top_from_hf = llama.top_from_hf
top_to_hf = llama.top_to_hf


def layer_from_hf(t: Mapping[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
    # The Llama function reads the attention, MLP and two of the norms; all four norms are
    # then set from their Gemma names.
    layer = llama.layer_from_hf(t, p, cfg)
    for ours, theirs in _NORMS.items():
        layer[ours] = {"scale": t[f"{p}{theirs}.weight"]}
    return layer


def layer_to_hf(layer: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = llama.layer_to_hf(layer, p, cfg)
    for ours, theirs in _NORMS.items():
        out[f"{p}{theirs}.weight"] = layer[ours]["scale"]
    return out
