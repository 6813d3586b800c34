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
