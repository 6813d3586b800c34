"""Hugging Face GPT-2 / Llama checkpoints to flaxlm run directories and back.

`from_hf(SRC, DST)` reads a local Hugging Face model directory (config.json and *.safetensors)
and writes DST as a flaxlm run directory: `config.yaml`, a step-0 checkpoint (parameters plus a
fresh optimizer state, so `train` can continue from it) and the tokenizer files under
`tokenizer/` (used by `flaxlm generate` and the lm-eval adapter). `to_hf(RUN_DIR, DST)` writes
config.json and model.safetensors that `transformers` loads with
`AutoModelForCausalLM.from_pretrained(DST)`.

Layouts: Hugging Face stores GPT-2 projections as Conv1D (in, out) with q, k and v concatenated,
and Llama projections as torch Linear (out, in); flaxlm keeps per-head kernels
(embed, heads, head_dim). Both use the rotate-half rotary convention, so Llama's q/k weights map
over without permutation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm import config as config_lib
from flaxlm.config import Config, ConfigError, ModelConfig

# --------------------------------------------------------------------------------------------
# Configs


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
    raise ConfigError(f"model_type {kind!r} is not supported; flaxlm converts gpt2 and llama")


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama' when cfg has exactly that architecture, else a ConfigError."""
    gpt2 = dict(
        norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True, use_bias=True
    )
    llama = dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False)
    for name, shape in (("gpt2", gpt2), ("llama", llama)):
        if all(getattr(cfg, k) == v for k, v in shape.items()):
            if name == "gpt2" and cfg.kv_heads != cfg.n_heads:
                raise ConfigError("GPT-2 has no grouped-query attention; set model.n_kv_heads=null")
            return name
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
    return {
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
        layers = [_llama_layer_from_hf(t, f"model.layers.{i}.", cfg) for i in range(cfg.n_layers)]
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
        for i, layer in enumerate(layers):
            out.update(_llama_layer_to_hf(layer, f"model.layers.{i}.", cfg))
    # safetensors wants contiguous buffers; transposes above are views.
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _check_shapes(params: dict, expected: dict) -> None:
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


# --------------------------------------------------------------------------------------------
# Directories


def _read_safetensors(src: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{src} has no *.safetensors files (PyTorch .bin files are not read)")
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
    return tensors


def from_hf(
    src: str | Path, dst: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Converts a Hugging Face model directory into a flaxlm run directory."""
    from flaxlm.mesh import make_mesh
    from flaxlm.run_dir import TOKENIZER_DIR, copy_tokenizer_files, write_checkpoint, write_config
    from flaxlm.train import Trainer, TrainState

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} is not a Hugging Face model directory: it has no config.json")
    if (dst / "checkpoints").exists():
        raise ConfigError(f"{dst} already holds checkpoints; choose a new directory")
    hf = json.loads((src / "config.json").read_text())
    model = [f"model.{k}={v}" for k, v in model_overrides_from_hf(hf).items()]
    data_len = min(hf.get("n_positions") or hf.get("max_position_embeddings"), 1024)
    # The run trains and evaluates with the model's own tokenizer (copied into dst/tokenizer).
    data = []
    if (src / "tokenizer.json").is_file():
        data = ["data.tokenizer=hf", f"data.tokenizer_path={(dst / TOKENIZER_DIR).absolute()}"]
    cfg = config_lib.load(
        None, [*model, f"data.seq_len={data_len}", f"train.run_dir={dst}", *data, *overrides]
    )

    trainer = Trainer(cfg, make_mesh(cfg))
    params = params_from_hf(_read_safetensors(src), cfg.model)
    _check_shapes(params, trainer.abstract_state.params)
    params = jax.tree.map(
        lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding),
        params,
        trainer.abstract_state.params,
    )
    with trainer.context():
        opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(
            params
        )
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=opt_state, skipped=zero)

    dst.mkdir(parents=True, exist_ok=True)
    write_config(dst, cfg)
    write_checkpoint(dst, 0, state, cfg)
    copy_tokenizer_files(src, dst / TOKENIZER_DIR)
    return cfg


def to_hf(run_dir: str | Path, dst: str | Path, step: int | None = None) -> None:
    """Writes a run's parameters as a Hugging Face model directory."""
    from safetensors.numpy import save_file

    from flaxlm.run_dir import TOKENIZER_DIR, copy_tokenizer_files, load_run

    run_dir, dst = Path(run_dir), Path(dst)
    cfg, _, params, _ = load_run(str(run_dir), step, [])
    tensors = params_to_hf(
        jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params)), cfg.model
    )
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf_config(cfg.model), indent=2))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer_files(run_dir / TOKENIZER_DIR, dst)
