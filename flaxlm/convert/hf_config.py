"""Model configs between Hugging Face config.json and flaxlm's `model` section."""

from __future__ import annotations

from typing import Any

from flaxlm.config import ConfigError, ModelConfig
from flaxlm.convert import mixtral


def model_overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The flaxlm `model` section for a Hugging Face config.json."""
    kind = hf.get("model_type")
    if kind == "gpt2":
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
        }
    if kind == "mixtral":
        return {**model_overrides_from_hf({**hf, "model_type": "llama"}), **_mixtral(hf)}
    if kind == "llama":
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("Llama checkpoints with attention or MLP biases are not supported")
        # transformers 5 nests rope settings under rope_parameters; 4.x had rope_theta and
        # rope_scaling at the top level. Accept both.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or rope
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
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
            "rope_theta": float(theta),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "use_bias": False,
        }
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "llama3":
            out.update(
                rope_scaling="llama3",
                rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_len=int(scaling["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ConfigError(f"Llama rope scaling {rope_type!r} is not supported (only llama3)")
        return out
    raise ConfigError(
        f"model_type {kind!r} is not supported; flaxlm converts gpt2, llama and mixtral"
    )


def _mixtral(hf: dict[str, Any]) -> dict[str, Any]:
    return mixtral.moe_overrides_from_hf(hf)


def family(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'mixtral' when cfg has exactly that architecture, else a
    ConfigError."""
    gpt2 = dict(
        norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True, use_bias=True
    )
    llama = dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False)
    for name, shape in (("gpt2", gpt2), ("llama", llama)):
        if all(getattr(cfg, k) == v for k, v in shape.items()):
            if name == "gpt2" and cfg.kv_heads != cfg.n_heads:
                raise ConfigError("GPT-2 has no grouped-query attention; set model.n_kv_heads=null")
            if name == "gpt2" and cfg.moe.enabled:
                raise ConfigError("GPT-2 has no mixture of experts; set model.moe.num_experts=0")
            return "mixtral" if name == "llama" and mixtral.is_mixtral(cfg) else name
    raise ConfigError(
        "the model is neither GPT-2 shaped (layernorm, gelu, learned positions, biases, tied "
        "embeddings) nor Llama shaped (rmsnorm, swiglu, rope, no biases); it has no Hugging "
        "Face equivalent"
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if family(cfg) == "gpt2":
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
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
    return {**llama, **mixtral.hf_config_fields(cfg)} if family(cfg) == "mixtral" else llama
