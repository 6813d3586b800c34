"""Parameters placed straight from Hugging Face tensors into their target shards, and read back
out one layer at a time: neither direction builds the whole model on the host.

Import: each parameter becomes a global array through `jax.make_array_from_callback`, whose
callback reads (from the memory-mapped safetensors) only the slice a local device holds, cast to
the parameter's dtype; the host holds one layer's converted tensors at a time. Export: one layer
is fetched from the devices, converted and handed to the shard writer, then dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax
import numpy as np

from flaxlm.config import ConfigError, ModelConfig
from flaxlm.convert.hf_config import module_for
from flaxlm.convert.params import _Stripped


def _put(value: np.ndarray, target: jax.ShapeDtypeStruct, name: str) -> jax.Array:
    if tuple(value.shape) != tuple(target.shape):
        raise ConfigError(
            f"parameter {name} has shape {tuple(value.shape)} in the checkpoint but the config "
            f"implies {tuple(target.shape)}"
        )
    dtype = target.dtype
    return jax.make_array_from_callback(
        target.shape, target.sharding, lambda idx: np.asarray(value[idx]).astype(dtype, copy=False)
    )


def _put_tree(tree: dict, targets: dict, prefix: str) -> dict:
    out = {}
    for key, target in targets.items():
        name = f"{prefix}['{key}']"
        if key not in tree:
            raise ConfigError(f"the checkpoint has no parameter for {name}")
        if isinstance(target, dict):
            out[key] = _put_tree(tree[key], target, name)
        else:
            out[key] = _put(tree[key], target, name)
    return out


def _leaf(tree: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return tree


def _put_stacked(t: Mapping, cfg: ModelConfig, targets: dict) -> dict:
    """The scanned blocks: each (layers, ...) parameter filled layer by layer on demand."""
    family = module_for(cfg)
    paths = [
        (tuple(str(k.key) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(targets)
    ]
    out: dict = {}
    for path, target in paths:

        def read(idx, path=path, target=target):
            rows = range(*idx[0].indices(target.shape[0]))
            layers = []
            for i in rows:
                layer = family.layer_from_hf(t, family.layer_prefix(i), cfg)
                value = _leaf(layer, path)
                name = "['blocks']" + "".join(f"['{k}']" for k in path)
                if tuple(value.shape) != tuple(target.shape[1:]):
                    raise ConfigError(
                        f"parameter {name} has shape {(target.shape[0], *value.shape)} in the "
                        f"checkpoint but the config implies {tuple(target.shape)}"
                    )
                layers.append(np.asarray(value[idx[1:]]).astype(target.dtype, copy=False))
            return np.stack(layers)

        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.make_array_from_callback(target.shape, target.sharding, read)
    return out


def place_params(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, targets: dict) -> dict:
    """flaxlm params as global arrays in the shardings and dtypes of `targets` (a tree of
    ShapeDtypeStructs with shardings), read from Hugging Face tensors one layer at a time."""
    family = module_for(cfg)
    t = _Stripped(tensors, family.STRIP_PREFIX)
    top = family.top_from_hf(t, cfg)
    top_targets = {k: v for k, v in targets.items() if k in top}
    params = _put_tree(top, top_targets, "")
    del top  # the embedding's host copy (often the largest tensor) goes before the layers come
    if cfg.scan_layers:
        params["blocks"] = _put_stacked(t, cfg, targets["blocks"])
    else:
        for i in range(cfg.n_layers):
            layer = family.layer_from_hf(t, family.layer_prefix(i), cfg)
            name = f"block_{i}"
            params[name] = _put_tree(layer, targets[name], f"['{name}']")
    missing = set(targets) - set(params)
    if missing:
        raise ConfigError(f"the checkpoint has no parameter for {sorted(missing)[0]}")
    return params


def hf_tensors(params: dict, cfg: ModelConfig, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of the Hugging Face checkpoint, one layer fetched at a time."""
    family = module_for(cfg)

    def fetch(tree):
        if jax.process_count() > 1:
            # A multi-process job: every process takes part in gathering this layer's shards
            # (one layer at a time, so no host ever holds the model).
            from jax.experimental import multihost_utils

            tree = multihost_utils.process_allgather(tree, tiled=True)
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(dtype, copy=False), tree)

    top = fetch({k: v for k, v in params.items() if k != "blocks" and not k.startswith("block_")})
    for name, value in family.top_to_hf(top, cfg).items():
        yield family.EXPORT_PREFIX + name, np.ascontiguousarray(value)
    del top
    for i in range(cfg.n_layers):
        if cfg.scan_layers:
            layer = fetch(jax.tree.map(lambda x, i=i: x[i], params["blocks"]))
        else:
            layer = fetch(params[f"block_{i}"])
        for name, value in family.layer_to_hf(layer, family.layer_prefix(i), cfg).items():
            yield family.EXPORT_PREFIX + name, np.ascontiguousarray(value)
