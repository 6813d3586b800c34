"""Mixtral (MixtralForCausalLM) between Hugging Face tensors/config.json and flaxlm.

Mixtral is a Llama with every MLP replaced by `num_local_experts` SwiGLU experts, of which each
token uses `num_experts_per_tok`, gated by a softmax over the chosen router logits (flaxlm's
`topk_softmax` router). Checkpoints store each expert as torch Linear weights (out, in):
`block_sparse_moe.experts.{e}.w1` (gate), `w3` (up) and `w2` (down), and the router as
`block_sparse_moe.gate`; flaxlm stacks the experts: gate/up (E, D, F), down (E, F, D), router
(D, E). The layer functions only index `t[name]`, so `t` may be any lazy mapping of tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxlm.config import ConfigError, ModelConfig
from flaxlm.convert import llama

MODEL_TYPES = ("mixtral",)
STRIP_PREFIX = llama.STRIP_PREFIX
EXPORT_PREFIX = llama.EXPORT_PREFIX
layer_prefix = llama.layer_prefix
top_from_hf = llama.top_from_hf
top_to_hf = llama.top_to_hf


def overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The flaxlm `model` section for a Mixtral config.json: Llama's, plus the experts."""
    return {**llama.overrides_from_hf({**hf, "model_type": "llama"}), **moe_overrides_from_hf(hf)}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**llama.hf_config(cfg), **hf_config_fields(cfg)}


def moe_overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The `model.moe.*` keys (flat, as overrides) for a Mixtral config.json."""
    if hf.get("sliding_window"):
        raise ConfigError(
            f"Mixtral sliding_window={hf['sliding_window']} is not supported (flaxlm attends "
            "to the whole causal context); only checkpoints with sliding_window null convert"
        )
    return {
        "moe.num_experts": hf["num_local_experts"],
        "moe.experts_per_token": hf["num_experts_per_tok"],
        "moe.router": "topk_softmax",
        "moe.dispatch": "dropless",
        "moe.aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.02)),
    }


def is_mixtral(cfg: ModelConfig) -> bool:
    """Whether a Llama-shaped cfg is a Mixtral (routed experts in every layer, no shared
    experts, top-k-then-softmax gates); ConfigError for other mixtures, which Hugging Face's
    Mixtral cannot express."""
    moe = cfg.moe
    if not moe.enabled:
        return False
    if (
        moe.num_shared_experts
        or moe.first_dense_layers
        or moe.every != 1
        or moe.router != "topk_softmax"
        or moe.d_expert not in (None, cfg.d_ff)
    ):
        raise ConfigError(
            "this mixture of experts has no Hugging Face equivalent: Mixtral needs routed "
            "experts of width model.d_ff in every layer, no shared experts and "
            "model.moe.router=topk_softmax"
        )
    return True


def hf_config_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The Mixtral-specific config.json fields (on top of Llama's)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.experts_per_token,
        "router_aux_loss_coef": cfg.moe.aux_loss_weight,
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


def layer_from_hf(t: Mapping[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
    """One decoder layer's flaxlm params from the tensors under prefix p (`model.layers.3.`):
    Llama's norms and attention, plus the router and the stacked experts."""
    moe = f"{p}block_sparse_moe."
    experts = range(cfg.moe.num_experts)

    def stacked(name: str):
        return np.stack([t[f"{moe}experts.{e}.{name}.weight"].T for e in experts])

    mlp = {
        "router": t[f"{moe}gate.weight"].T,
        "gate": stacked("w1"),
        "up": stacked("w3"),
        "down": stacked("w2"),
    }
    return {**llama.attention_from_hf(t, p, cfg), "mlp": mlp}


def layer_to_hf(layer: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of one decoder layer (the inverse of `layer_from_hf`)."""
    m = layer["mlp"]
    moe = f"{p}block_sparse_moe."
    out = {**llama.attention_to_hf(layer, p, cfg), f"{moe}gate.weight": m["router"].T}
    for e in range(cfg.moe.num_experts):
        for hf_name, name in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            out[f"{moe}experts.{e}.{hf_name}.weight"] = m[name][e].T
    return out
