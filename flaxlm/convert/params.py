"""Parameters between Hugging Face tensor names/layouts and flaxlm's parameter tree, one layer at
a time through the family modules (`flaxlm.convert.hf_config.MODULES`)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from flaxlm.config import ConfigError, ModelConfig
from flaxlm.convert.hf_config import module_for


class _Stripped(Mapping):
    """tensors seen without a name prefix (lazy: nothing is read until indexed)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def __getitem__(self, name: str) -> np.ndarray:
        if self.prefix and self.prefix + name in self.tensors:
            return self.tensors[self.prefix + name]
        return self.tensors[name]

    def __iter__(self):
        return (k.removeprefix(self.prefix) for k in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """flaxlm params (numpy) from Hugging Face tensors; layers stacked when cfg.scan_layers."""
    family = module_for(cfg)
    t = _Stripped(tensors, family.STRIP_PREFIX)
    layers = [family.layer_from_hf(t, family.layer_prefix(i), cfg) for i in range(cfg.n_layers)]
    params = family.top_from_hf(t, cfg)
    if cfg.scan_layers:
        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params.update({f"block_{i}": layer for i, layer in enumerate(layers)})
    return params


def layers_of(params: dict, cfg: ModelConfig) -> list[dict]:
    """The per-layer parameter trees (unstacked from `blocks` when scanned)."""
    if cfg.scan_layers:
        return [jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(cfg.n_layers)]
    return [params[f"block_{i}"] for i in range(cfg.n_layers)]


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors (numpy) from flaxlm params."""
    family = module_for(cfg)
    out = dict(family.top_to_hf(params, cfg))
    for i, layer in enumerate(layers_of(params, cfg)):
        out.update(family.layer_to_hf(layer, family.layer_prefix(i), cfg))
    # safetensors wants contiguous buffers; transposes above are views.
    return {family.EXPORT_PREFIX + k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names (without the family's STRIP_PREFIX) and shapes of a model
    of cfg, from the family's own export of a stand-in parameter tree: zero-stride arrays of one
    byte, one layer at a time, so no second table of layouts can drift from the converters."""
    import flax.linen as nn
    import jax.numpy as jnp

    from flaxlm.model import Transformer

    tokens = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens))
    params = jax.tree.map(
        lambda s: np.broadcast_to(np.zeros((), np.bool_), s.shape),
        nn.meta.unbox(abstract["params"]),
    )
    family = module_for(cfg)
    shapes = {k: v.shape for k, v in family.top_to_hf(params, cfg).items()}
    for i, layer in enumerate(layers_of(params, cfg)):
        exported = family.layer_to_hf(layer, family.layer_prefix(i), cfg)
        shapes |= {k: v.shape for k, v in exported.items()}
    return shapes


def check_hf_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> None:
    """Every tensor the config implies must be there with its shape, checked (from the file
    headers when `tensors` can tell shapes without reading) before any is indexed or reshaped;
    names the first that is missing or of another shape."""
    family = module_for(cfg)
    t = _Stripped(tensors, family.STRIP_PREFIX)
    shape_of = getattr(tensors, "shape", None)
    for name, shape in hf_shapes(cfg).items():
        full = family.STRIP_PREFIX + name if family.STRIP_PREFIX + name in tensors else name
        if full not in tensors:
            raise ConfigError(
                f"the safetensors files have no tensor {name!r} (a {family.MODEL_TYPES[0]} model "
                f"of {cfg.n_layers} layers needs it); the checkpoint is incomplete or of another "
                "architecture than its config.json"
            )
        got = tuple(shape_of(full)) if shape_of is not None else tuple(t[name].shape)
        if got != tuple(shape):
            raise ConfigError(
                f"tensor {name!r} has shape {got} but config.json implies {tuple(shape)}; the "
                "weights belong to another model than config.json describes"
            )


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
