"""GPT-2: Hugging Face `GPT2LMHeadModel` tensors and config.json to flaxlm and back.

Hugging Face stores GPT-2 projections as Conv1D (in, out) with q, k and v concatenated; flaxlm
keeps per-head kernels (embed, heads, head_dim).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxlm.config import ConfigError, ModelConfig

MODEL_TYPES = ("gpt2",)
# Older GPT-2 checkpoints have no "transformer." prefix; names are read without it.
STRIP_PREFIX = "transformer."
EXPORT_PREFIX = "transformer."


def layer_prefix(i: int) -> str:
    return f"h.{i}."


def overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"GPT-2 activation {hf['activation_function']!r} is not supported")
    d = hf["n_embd"]
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "n_layers": hf["n_layer"],
        "n_heads": hf["n_head"],
        "d_ff": hf.get("n_inner") or 4 * d,
        "max_seq_len": hf["n_positions"],
        "norm": "layernorm",
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "mlp": "gelu",
        "position": "learned",
        "tie_embeddings": True,
        "use_bias": True,
        "dropout_embed": hf.get("embd_pdrop", 0.0),
        "dropout_attn": hf.get("attn_pdrop", 0.0),
        "dropout_residual": hf.get("resid_pdrop", 0.0),
    }


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "resid_pdrop": cfg.dropout_residual,
        "embd_pdrop": cfg.dropout_embed,
        "attn_pdrop": cfg.dropout_attn,
    }


def top_from_hf(t: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """The parameters outside the blocks."""
    return {
        "embed": {"embedding": t["wte.weight"]},
        "pos_embed": {"embedding": t["wpe.weight"]},
        "final_norm": {"scale": t["ln_f.weight"], "bias": t["ln_f.bias"]},
    }


def top_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    return {
        "wte.weight": params["embed"]["embedding"],
        "wpe.weight": params["pos_embed"]["embedding"],
        "ln_f.weight": params["final_norm"]["scale"],
        "ln_f.bias": params["final_norm"]["bias"],
    }


def layer_from_hf(t: Mapping[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.dim_per_head
    qkv_w, qkv_b = t[f"{p}attn.c_attn.weight"], t[f"{p}attn.c_attn.bias"]
    q_w, k_w, v_w = np.split(qkv_w, 3, axis=1)
    q_b, k_b, v_b = np.split(qkv_b, 3)
    return {
        "attn_norm": {"scale": t[f"{p}ln_1.weight"], "bias": t[f"{p}ln_1.bias"]},
        "attn": {
            "query": {"kernel": q_w.reshape(d, h, hd), "bias": q_b.reshape(h, hd)},
            "key": {"kernel": k_w.reshape(d, h, hd), "bias": k_b.reshape(h, hd)},
            "value": {"kernel": v_w.reshape(d, h, hd), "bias": v_b.reshape(h, hd)},
            "out": {
                "kernel": t[f"{p}attn.c_proj.weight"].reshape(h, hd, d),
                "bias": t[f"{p}attn.c_proj.bias"],
            },
        },
        "mlp_norm": {"scale": t[f"{p}ln_2.weight"], "bias": t[f"{p}ln_2.bias"]},
        "mlp": {
            "up": {"kernel": t[f"{p}mlp.c_fc.weight"], "bias": t[f"{p}mlp.c_fc.bias"]},
            "down": {"kernel": t[f"{p}mlp.c_proj.weight"], "bias": t[f"{p}mlp.c_proj.bias"]},
        },
    }


def layer_to_hf(layer: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    d = cfg.d_model
    a, m = layer["attn"], layer["mlp"]
    return {
        f"{p}ln_1.weight": layer["attn_norm"]["scale"],
        f"{p}ln_1.bias": layer["attn_norm"]["bias"],
        f"{p}attn.c_attn.weight": np.concatenate(
            [a[n]["kernel"].reshape(d, -1) for n in ("query", "key", "value")], axis=1
        ),
        f"{p}attn.c_attn.bias": np.concatenate(
            [a[n]["bias"].reshape(-1) for n in ("query", "key", "value")]
        ),
        f"{p}attn.c_proj.weight": a["out"]["kernel"].reshape(-1, d),
        f"{p}attn.c_proj.bias": a["out"]["bias"],
        f"{p}ln_2.weight": layer["mlp_norm"]["scale"],
        f"{p}ln_2.bias": layer["mlp_norm"]["bias"],
        f"{p}mlp.c_fc.weight": m["up"]["kernel"],
        f"{p}mlp.c_fc.bias": m["up"]["bias"],
        f"{p}mlp.c_proj.weight": m["down"]["kernel"],
        f"{p}mlp.c_proj.bias": m["down"]["bias"],
    }
