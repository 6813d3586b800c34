"""Parameters between Hugging Face tensor names/layouts and flaxlm's parameter tree."""

from __future__ import annotations

import jax
import numpy as np

from flaxlm.config import ConfigError, ModelConfig
from flaxlm.convert import mixtral
from flaxlm.convert.hf_config import family

# --------------------------------------------------------------------------------------------
# Parameters. Both directions go through a flat {flaxlm path: array} of one layer at a time.


def _gpt2_layer_from_hf(t: dict[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
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


def _gpt2_layer_to_hf(layer: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
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


def _llama_layer_from_hf(t: dict[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    return {
        "attn_norm": {"scale": t[f"{p}input_layernorm.weight"]},
        "attn": {
            "query": {"kernel": t[f"{p}self_attn.q_proj.weight"].T.reshape(d, h, hd)},
            "key": {"kernel": t[f"{p}self_attn.k_proj.weight"].T.reshape(d, kv, hd)},
            "value": {"kernel": t[f"{p}self_attn.v_proj.weight"].T.reshape(d, kv, hd)},
            "out": {"kernel": t[f"{p}self_attn.o_proj.weight"].T.reshape(h, hd, d)},
        },
        "mlp_norm": {"scale": t[f"{p}post_attention_layernorm.weight"]},
        "mlp": {
            "gate": {"kernel": t[f"{p}mlp.gate_proj.weight"].T},
            "up": {"kernel": t[f"{p}mlp.up_proj.weight"].T},
            "down": {"kernel": t[f"{p}mlp.down_proj.weight"].T},
        },
    }


def _llama_layer_to_hf(layer: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    d = cfg.d_model
    a, m = layer["attn"], layer["mlp"]
    return {
        f"{p}input_layernorm.weight": layer["attn_norm"]["scale"],
        f"{p}self_attn.q_proj.weight": a["query"]["kernel"].reshape(d, -1).T,
        f"{p}self_attn.k_proj.weight": a["key"]["kernel"].reshape(d, -1).T,
        f"{p}self_attn.v_proj.weight": a["value"]["kernel"].reshape(d, -1).T,
        f"{p}self_attn.o_proj.weight": a["out"]["kernel"].reshape(-1, d).T,
        f"{p}post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
        f"{p}mlp.gate_proj.weight": m["gate"]["kernel"].T,
        f"{p}mlp.up_proj.weight": m["up"]["kernel"].T,
        f"{p}mlp.down_proj.weight": m["down"]["kernel"].T,
    }


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """flaxlm params (numpy) from Hugging Face tensors; layers stacked when cfg.scan_layers."""
    # Older GPT-2 checkpoints have no "transformer." prefix; some carry attention-mask buffers.
    t = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if family(cfg) == "gpt2":
        layers = [_gpt2_layer_from_hf(t, f"h.{i}.", cfg) for i in range(cfg.n_layers)]
        params = {
            "embed": {"embedding": t["wte.weight"]},
            "pos_embed": {"embedding": t["wpe.weight"]},
            "final_norm": {"scale": t["ln_f.weight"], "bias": t["ln_f.bias"]},
        }
    else:
        from_hf = mixtral.layer_from_hf if family(cfg) == "mixtral" else _llama_layer_from_hf
        layers = [from_hf(t, f"model.layers.{i}.", cfg) for i in range(cfg.n_layers)]
        params = {
            "embed": {"embedding": t["model.embed_tokens.weight"]},
            "final_norm": {"scale": t["model.norm.weight"]},
        }
        if not cfg.tie_embeddings:
            params["lm_head"] = {"kernel": t["lm_head.weight"].T}
    if cfg.scan_layers:
        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params.update({f"block_{i}": layer for i, layer in enumerate(layers)})
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors (numpy) from flaxlm params."""
    if cfg.scan_layers:
        layers = [jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(cfg.n_layers)]
    else:
        layers = [params[f"block_{i}"] for i in range(cfg.n_layers)]
    if family(cfg) == "gpt2":
        out = {
            "transformer.wte.weight": params["embed"]["embedding"],
            "transformer.wpe.weight": params["pos_embed"]["embedding"],
            "transformer.ln_f.weight": params["final_norm"]["scale"],
            "transformer.ln_f.bias": params["final_norm"]["bias"],
        }
        for i, layer in enumerate(layers):
            out.update(_gpt2_layer_to_hf(layer, f"transformer.h.{i}.", cfg))
    else:
        out = {
            "model.embed_tokens.weight": params["embed"]["embedding"],
            "model.norm.weight": params["final_norm"]["scale"],
        }
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = params["lm_head"]["kernel"].T
        to_hf = mixtral.layer_to_hf if family(cfg) == "mixtral" else _llama_layer_to_hf
        for i, layer in enumerate(layers):
            out.update(to_hf(layer, f"model.layers.{i}.", cfg))
    # safetensors wants contiguous buffers; transposes above are views.
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def check_shapes(params: dict, expected: dict) -> None:
    """Every parameter must have the shape the config implies; name the first that does not."""
    got = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {
        jax.tree_util.keystr(p): tuple(v.shape)
        for p, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    for name in sorted(want):
        if name not in got:
            raise ConfigError(f"the checkpoint has no parameter for {name}")
        if tuple(got[name]) != want[name]:
            raise ConfigError(
                f"parameter {name} has shape {tuple(got[name])} in the checkpoint but the config "
                f"implies {want[name]}"
            )
