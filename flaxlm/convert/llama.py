"""The Llama-shaped families: Llama, Mistral, Qwen2 and Qwen3 (`*ForCausalLM`) to flaxlm and back.

All four share one layer layout (torch Linear (out, in) projections, RMSNorm, SwiGLU, rotary
positions in the rotate-half convention, so q/k map over without permutation); they differ by
options: Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm. flaxlm
keeps per-head kernels (embed, heads, head_dim).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxlm.config import ConfigError, ModelConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STRIP_PREFIX = ""
EXPORT_PREFIX = ""
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def family_of(cfg: ModelConfig) -> str:
    """Which Hugging Face family a Llama-shaped flaxlm config is (its options decide)."""
    if cfg.qk_norm:
        if cfg.qkv_bias or cfg.sliding_window:
            raise ConfigError("Qwen3 (model.qk_norm) has no q/k/v-only biases or sliding window")
        return "qwen3"
    if cfg.qkv_bias:
        if cfg.sliding_window:
            raise ConfigError("Qwen2 (model.qkv_bias) is converted without a sliding window")
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def _rope_overrides(hf: dict[str, Any], kind: str) -> dict[str, Any]:
    # transformers 5 nests rope settings under rope_parameters; 4.x had rope_theta and
    # rope_scaling at the top level. Accept both.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or rope
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 1e4)))}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_scaling_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_len=int(scaling["original_max_position_embeddings"]),
        )
    elif rope_type == "linear":
        out.update(rope_scaling="linear", rope_scaling_factor=float(scaling["factor"]))
    elif rope_type == "yarn":
        out.update(_yarn_overrides(hf, scaling))
    elif rope_type not in ("default", None):
        raise ConfigError(
            f"{kind} rope scaling {rope_type!r} is not supported (llama3, linear and yarn are)"
        )
    return out


def _yarn_overrides(hf: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    old_len = int(scaling.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    factor = scaling.get("factor") or hf["max_position_embeddings"] / old_len
    attention = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim and factor > 1:
        # DeepSeek's form: a ratio of two temperatures; flaxlm stores the resulting factor.
        attention = (0.1 * mscale * math.log(factor) + 1) / (
            0.1 * mscale_all_dim * math.log(factor) + 1
        )
    if scaling.get("truncate", True) is False:
        raise ConfigError("yarn rope scaling with truncate=false is not supported")
    return {
        "rope_scaling": "yarn",
        "rope_scaling_factor": float(factor),
        "rope_original_max_len": old_len,
        "rope_yarn_beta_fast": float(scaling.get("beta_fast") or 32),
        "rope_yarn_beta_slow": float(scaling.get("beta_slow") or 1),
        "rope_attention_factor": None if attention is None else float(attention),
    }


def overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    kind = hf["model_type"]
    if kind in ("llama", "mistral") and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ConfigError(f"{kind} checkpoints with attention or MLP biases are not supported")
    if kind == "qwen3" and hf.get("attention_bias"):
        raise ConfigError("Qwen3 checkpoints with attention biases are not supported")
    if kind in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ConfigError(f"{kind} with use_sliding_window=true is not supported")
    out = {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"],
        "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "d_ff": hf["intermediate_size"],
        "max_seq_len": hf["max_position_embeddings"],
        "norm": "rmsnorm",
        "norm_eps": hf.get("rms_norm_eps", 1e-5),
        "mlp": "swiglu",
        "position": "rope",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "use_bias": False,
        "qkv_bias": kind == "qwen2",
        "qk_norm": kind == "qwen3",
        "sliding_window": hf.get("sliding_window") if kind == "mistral" else None,
        **_rope_overrides(hf, kind),
    }
    return out


def _hf_rope(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's rope_parameters for cfg's rotary embedding and its scaling."""
    kind = cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": "default" if kind == "none" else str(kind)}
    rope["rope_theta"] = cfg.rope_theta
    if kind != "none":
        rope["factor"] = cfg.rope_scaling_factor
    if kind == "llama3":
        rope["low_freq_factor"] = cfg.rope_low_freq_factor
        rope["high_freq_factor"] = cfg.rope_high_freq_factor
    if kind in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = cfg.rope_original_max_len
    if kind == "yarn":
        rope["beta_fast"], rope["beta_slow"] = cfg.rope_yarn_beta_fast, cfg.rope_yarn_beta_slow
        if cfg.rope_attention_factor is not None:
            rope["attention_factor"] = cfg.rope_attention_factor
    return rope


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    kind = family_of(cfg)
    rope = _hf_rope(cfg)
    out = {
        "architectures": [_ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        # Both spellings, so that transformers 4.x and 5.x read the same rope settings.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling == "llama3" else None,
        "rope_parameters": rope,
    }
    if kind == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if kind in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def top_from_hf(t: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """The parameters outside the blocks."""
    params = {
        "embed": {"embedding": t["model.embed_tokens.weight"]},
        "final_norm": {"scale": t["model.norm.weight"]},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": t["lm_head.weight"].T}
    return params


def top_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {
        "model.embed_tokens.weight": params["embed"]["embedding"],
        "model.norm.weight": params["final_norm"]["scale"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out


def attention_from_hf(t: Mapping[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
    """One decoder layer's params but its MLP: both norms and the attention (with its q/k/v
    biases and q/k norms where cfg has them), from the tensors under prefix p. Shared with the
    families that differ from Llama only in the MLP (Mixtral)."""
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    a = f"{p}self_attn."
    attn = {
        "query": {"kernel": t[f"{a}q_proj.weight"].T.reshape(d, h, hd)},
        "key": {"kernel": t[f"{a}k_proj.weight"].T.reshape(d, kv, hd)},
        "value": {"kernel": t[f"{a}v_proj.weight"].T.reshape(d, kv, hd)},
        "out": {"kernel": t[f"{a}o_proj.weight"].T.reshape(h, hd, d)},
    }
    if cfg.qkv_bias:
        for name, heads in (("query", h), ("key", kv), ("value", kv)):
            attn[name]["bias"] = t[f"{a}{name[0]}_proj.bias"].reshape(heads, hd)
    if cfg.qk_norm:
        attn["query_norm"] = {"scale": t[f"{a}q_norm.weight"]}
        attn["key_norm"] = {"scale": t[f"{a}k_norm.weight"]}
    return {
        "attn_norm": {"scale": t[f"{p}input_layernorm.weight"]},
        "attn": attn,
        "mlp_norm": {"scale": t[f"{p}post_attention_layernorm.weight"]},
    }


def attention_to_hf(layer: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of one decoder layer but its MLP (the inverse of
    `attention_from_hf`)."""
    d = cfg.d_model
    a = layer["attn"]
    out = {
        f"{p}input_layernorm.weight": layer["attn_norm"]["scale"],
        f"{p}self_attn.q_proj.weight": a["query"]["kernel"].reshape(d, -1).T,
        f"{p}self_attn.k_proj.weight": a["key"]["kernel"].reshape(d, -1).T,
        f"{p}self_attn.v_proj.weight": a["value"]["kernel"].reshape(d, -1).T,
        f"{p}self_attn.o_proj.weight": a["out"]["kernel"].reshape(-1, d).T,
        f"{p}post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
    }
    if cfg.qkv_bias:
        for name in ("query", "key", "value"):
            out[f"{p}self_attn.{name[0]}_proj.bias"] = a[name]["bias"].reshape(-1)
    if cfg.qk_norm:
        out[f"{p}self_attn.q_norm.weight"] = a["query_norm"]["scale"]
        out[f"{p}self_attn.k_norm.weight"] = a["key_norm"]["scale"]
    return out


def layer_from_hf(t: Mapping[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
    mlp = {
        "gate": {"kernel": t[f"{p}mlp.gate_proj.weight"].T},
        "up": {"kernel": t[f"{p}mlp.up_proj.weight"].T},
        "down": {"kernel": t[f"{p}mlp.down_proj.weight"].T},
    }
    return {**attention_from_hf(t, p, cfg), "mlp": mlp}


def layer_to_hf(layer: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    m = layer["mlp"]
    return {
        **attention_to_hf(layer, p, cfg),
        f"{p}mlp.gate_proj.weight": m["gate"]["kernel"].T,
        f"{p}mlp.up_proj.weight": m["up"]["kernel"].T,
        f"{p}mlp.down_proj.weight": m["down"]["kernel"].T,
    }
