"""Model configs between Hugging Face config.json and flaxlm's `model` section, and the table of
family modules (one per layer layout: `flaxlm.convert.gpt2`, `flaxlm.convert.llama`, ...).

A family module provides MODEL_TYPES (the config.json model_types it reads), STRIP_PREFIX /
EXPORT_PREFIX (a prefix removed from tensor names on import and added on export),
`layer_prefix(i)`, `overrides_from_hf(hf)`, `hf_config(cfg)`, `top_from_hf(t, cfg)` /
`top_to_hf(params, cfg)` for the parameters outside the blocks, and the per-layer
`layer_from_hf(t, prefix, cfg)` / `layer_to_hf(layer, prefix, cfg)`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from flaxlm.config import Arch, ConfigError, ModelConfig
from flaxlm.convert import bert, gemma, gpt2, llama, mixtral

MODULES: tuple[ModuleType, ...] = (gpt2, llama, gemma, mixtral, bert)


def module_for_model_type(kind: str | None) -> ModuleType:
    for module in MODULES:
        if kind in module.MODEL_TYPES:
            return module
    known = ", ".join(t for m in MODULES for t in m.MODEL_TYPES)
    raise ConfigError(f"model_type {kind!r} is not supported; flaxlm converts {known}")


def model_overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The flaxlm `model` section for a Hugging Face config.json."""
    return module_for_model_type(hf.get("model_type")).overrides_from_hf(hf)


def family(cfg: ModelConfig) -> str:
    """The Hugging Face model_type of cfg's architecture ('gpt2', 'llama', 'mistral', 'qwen2',
    'qwen3', 'gemma2', 'mixtral', 'bert'), else a ConfigError."""
    if cfg.arch == Arch.encoder:
        # Validation keeps encoders to BERT's shape but for these choices.
        if cfg.norm != "layernorm" or cfg.mlp not in ("gelu", "gelu_exact") or not cfg.use_bias:
            raise ConfigError(
                "only a BERT-shaped encoder converts (model.norm=layernorm, model.mlp=gelu_exact, "
                "model.use_bias=true)"
            )
        return "bert"
    gpt2_shape = dict(
        norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True, use_bias=True
    )
    llama_shape = dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False)
    if all(getattr(cfg, k) == v for k, v in gpt2_shape.items()):
        if cfg.kv_heads != cfg.n_heads:
            raise ConfigError("GPT-2 has no grouped-query attention; set model.n_kv_heads=null")
        if cfg.qk_norm or cfg.sliding_window:
            raise ConfigError("GPT-2 has no q/k norm or sliding window")
        if cfg.moe.enabled:
            raise ConfigError("GPT-2 has no mixture of experts; set model.moe.num_experts=0")
        return "gpt2"
    if cfg.moe.enabled and not all(getattr(cfg, k) == v for k, v in llama_shape.items()):
        raise ConfigError("only a Llama-shaped mixture of experts (Mixtral) converts")
    gemma_shape = {**llama_shape, "mlp": "geglu", "post_norms": True}
    if all(getattr(cfg, k) == v for k, v in gemma_shape.items()):
        return "gemma2"
    gemma_only = (
        "norm_scale_offset", "embed_scale", "post_norms", "global_every", "query_scale",
        "attn_logit_softcap", "final_logit_softcap",
    )  # fmt: skip
    if all(getattr(cfg, k) == v for k, v in llama_shape.items()) and not any(
        getattr(cfg, k) for k in gemma_only
    ):
        return "mixtral" if mixtral.is_mixtral(cfg) else llama.family_of(cfg)
    raise ConfigError(
        "the model is neither GPT-2 shaped (layernorm, gelu, learned positions, biases, tied "
        "embeddings) nor Llama shaped (rmsnorm, swiglu, rope, no biases); it has no Hugging "
        "Face equivalent"
    )


def module_for(cfg: ModelConfig) -> ModuleType:
    return module_for_model_type(family(cfg))


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return module_for(cfg).hf_config(cfg)
