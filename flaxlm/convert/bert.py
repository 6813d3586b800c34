"""BERT: Hugging Face `BertForMaskedLM` tensors and config.json to flaxlm and back.

Hugging Face stores the projections as torch Linear (out, in); flaxlm keeps per-head kernels
(embed, heads, head_dim). The masked-LM decoder is tied to the word embeddings (its weight is
not stored); its bias is `cls.predictions.bias`. A pretraining checkpoint's pooler and
next-sentence head (`bert.pooler.*`, `cls.seq_relationship.*`) are left out on import: flaxlm
pretrains with masked-LM alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxlm.config import ConfigError, ModelConfig

MODEL_TYPES = ("bert",)
STRIP_PREFIX = ""
EXPORT_PREFIX = ""
# Hugging Face's activation names: "gelu" is the exact (erf) GELU, "gelu_new" the tanh one.
_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def layer_prefix(i: int) -> str:
    return f"bert.encoder.layer.{i}."


def overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"BERT activation {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported "
            "(absolute is)"
        )
    hidden_dropout = hf.get("hidden_dropout_prob", 0.0)
    return {
        "arch": "encoder",
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"],
        "d_ff": hf["intermediate_size"],
        "max_seq_len": hf["max_position_embeddings"],
        "type_vocab_size": hf.get("type_vocab_size", 2),
        "norm": "layernorm",
        "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "mlp": _ACTIVATIONS[act],
        "position": "learned",
        "tie_embeddings": True,
        "use_bias": True,
        "dropout_embed": hidden_dropout,
        "dropout_attn": hf.get("attention_probs_dropout_prob", 0.0),
        "dropout_residual": hidden_dropout,
    }


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.dropout_embed != cfg.dropout_residual:
        raise ConfigError(
            f"BERT has one hidden dropout rate; model.dropout_embed={cfg.dropout_embed} and "
            f"model.dropout_residual={cfg.dropout_residual} differ"
        )
    return {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": cfg.dropout_residual,
        "attention_probs_dropout_prob": cfg.dropout_attn,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
    }


def _norm(t: Mapping[str, np.ndarray], name: str) -> dict:
    return {"scale": t[f"{name}.weight"], "bias": t[f"{name}.bias"]}


def _linear(t: Mapping[str, np.ndarray], name: str) -> dict:
    """A torch Linear (out, in) as a flax Dense kernel (in, out) and bias."""
    return {"kernel": t[f"{name}.weight"].T, "bias": t[f"{name}.bias"]}


def top_from_hf(t: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """The embeddings and the masked-LM head."""
    e = "bert.embeddings."
    return {
        "embed": {"embedding": t[f"{e}word_embeddings.weight"]},
        "pos_embed": {"embedding": t[f"{e}position_embeddings.weight"]},
        "type_embed": {"embedding": t[f"{e}token_type_embeddings.weight"]},
        "embed_norm": _norm(t, f"{e}LayerNorm"),
        "mlm_dense": _linear(t, "cls.predictions.transform.dense"),
        "mlm_norm": _norm(t, "cls.predictions.transform.LayerNorm"),
        "mlm_bias": t["cls.predictions.bias"],
    }


def top_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    e, h = "bert.embeddings.", "cls.predictions."
    return {
        f"{e}word_embeddings.weight": params["embed"]["embedding"],
        f"{e}position_embeddings.weight": params["pos_embed"]["embedding"],
        f"{e}token_type_embeddings.weight": params["type_embed"]["embedding"],
        f"{e}LayerNorm.weight": params["embed_norm"]["scale"],
        f"{e}LayerNorm.bias": params["embed_norm"]["bias"],
        f"{h}transform.dense.weight": params["mlm_dense"]["kernel"].T,
        f"{h}transform.dense.bias": params["mlm_dense"]["bias"],
        f"{h}transform.LayerNorm.weight": params["mlm_norm"]["scale"],
        f"{h}transform.LayerNorm.bias": params["mlm_norm"]["bias"],
        f"{h}bias": params["mlm_bias"],
    }


def layer_from_hf(t: Mapping[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.dim_per_head

    def head_proj(name: str) -> dict:
        w, b = t[f"{p}attention.self.{name}.weight"], t[f"{p}attention.self.{name}.bias"]
        return {"kernel": w.T.reshape(d, h, hd), "bias": b.reshape(h, hd)}

    out_w = t[f"{p}attention.output.dense.weight"]
    return {
        "attn": {
            "query": head_proj("query"),
            "key": head_proj("key"),
            "value": head_proj("value"),
            "out": {
                "kernel": out_w.T.reshape(h, hd, d),
                "bias": t[f"{p}attention.output.dense.bias"],
            },
        },
        "attn_norm": _norm(t, f"{p}attention.output.LayerNorm"),
        "mlp": {"up": _linear(t, f"{p}intermediate.dense"), "down": _linear(t, f"{p}output.dense")},
        "mlp_norm": _norm(t, f"{p}output.LayerNorm"),
    }


def layer_to_hf(layer: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    d = cfg.d_model
    a, m = layer["attn"], layer["mlp"]
    out = {}
    for name in ("query", "key", "value"):
        out[f"{p}attention.self.{name}.weight"] = a[name]["kernel"].reshape(d, -1).T
        out[f"{p}attention.self.{name}.bias"] = a[name]["bias"].reshape(-1)
    out[f"{p}attention.output.dense.weight"] = a["out"]["kernel"].reshape(-1, d).T
    out[f"{p}attention.output.dense.bias"] = a["out"]["bias"]
    out[f"{p}attention.output.LayerNorm.weight"] = layer["attn_norm"]["scale"]
    out[f"{p}attention.output.LayerNorm.bias"] = layer["attn_norm"]["bias"]
    out[f"{p}intermediate.dense.weight"] = m["up"]["kernel"].T
    out[f"{p}intermediate.dense.bias"] = m["up"]["bias"]
    out[f"{p}output.dense.weight"] = m["down"]["kernel"].T
    out[f"{p}output.dense.bias"] = m["down"]["bias"]
    out[f"{p}output.LayerNorm.weight"] = layer["mlp_norm"]["scale"]
    out[f"{p}output.LayerNorm.bias"] = layer["mlp_norm"]["bias"]
    return out
