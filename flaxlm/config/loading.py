"""Loading configs: YAML composition, command-line overrides, (de)serialisation.

OmegaConf does the merging, the `key.sub=value` overrides and the type checks (an unknown key or
a value of the wrong type fails with the full key named). Composition is one convention on top:
a YAML file may start with

    defaults: [base.yaml, models/tiny.yaml]

listing files (relative to it) that are merged first, in order, then the file itself. Every
loaded config is validated before it is returned.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etils import epath
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from flaxlm.config.enums import ConfigError
from flaxlm.config.schema import Config, DistributedConfig
from flaxlm.config.validation import validate

# Keys that name a file or directory: `~` and environment variables in them are expanded.
_PATH_KEYS = {
    "data": ("train_files", "eval_files", "tfds_data_dir", "tokenizer_path", "cache_dir"),
    "train": ("run_dir", "init_from"),
}
_SOURCE_PATH_KEYS = ("train_files", "eval_files", "tfds_data_dir")


def expand_path(path: str) -> str:
    """path with `~` and `$VAR` expanded (also inside gs:// URLs)."""
    return os.path.expanduser(os.path.expandvars(path))


def read_yaml_tree(
    path: Any, chain: tuple[Any, ...] = (), relative_keys: tuple[str, ...] = ()
) -> list[Any]:
    """Returns the OmegaConf nodes of `path` (local or gs://) and its `defaults`, in merge
    order. Top-level `relative_keys` hold paths relative to their own file; they are made
    absolute, so that a file that inherits them still finds what they name."""
    text = expand_path(os.fspath(path))
    path = epath.Path(text) if "://" in text else epath.Path(Path(text).resolve())
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config files include each other in a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.create(path.read_text())
    except Exception as e:  # yaml errors carry the line number
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if OmegaConf.is_dict(node) and not node and not chain:
        raise ConfigError(f"config file {path} is empty; start from configs/base.yaml")
    if not OmegaConf.is_dict(node):
        raise ConfigError(
            f"config file {path} holds a {type(node).__name__.removesuffix('Config').lower()} at "
            "its top level; it must be a mapping of sections (model:, data:, train:, ...)"
        )
    defaults = node.pop("defaults", [])
    if isinstance(defaults, str) or not OmegaConf.is_list(defaults):
        defaults = [defaults] if defaults else []
    for key in relative_keys:
        if isinstance(node.get(key), str):
            node[key] = str(path.parent / node[key])
    nodes = []
    for parent in defaults:
        nodes += read_yaml_tree(path.parent / str(parent), (*chain, path), relative_keys)
    return [*nodes, node]


def _merge(nodes: Sequence[Any], overrides: Sequence[str], source: str) -> Config:
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        merged = OmegaConf.merge(schema, *nodes, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        first_line = _enum_choices(e) or str(e).splitlines()[0]
        where = f"config key {key!r}" if key else "config"
        raise ConfigError(f"{where} (from {source}): {first_line}") from None
    assert isinstance(cfg, Config)
    return _expand_paths(cfg)


def _expand_paths(cfg: Config) -> Config:
    """cfg with `~` and environment variables expanded in every key that names a path."""

    def expanded(section: Any, keys: Sequence[str]) -> dict[str, Any]:
        return {
            k: expand_path(getattr(section, k))
            for k in keys
            if hasattr(section, k) and isinstance(getattr(section, k), str)
        }

    data = dataclasses.replace(cfg.data, **expanded(cfg.data, _PATH_KEYS["data"]))
    mixture = [dataclasses.replace(s, **expanded(s, _SOURCE_PATH_KEYS)) for s in data.mixture]
    data = dataclasses.replace(data, mixture=mixture)
    train = dataclasses.replace(cfg.train, **expanded(cfg.train, _PATH_KEYS["train"]))
    return dataclasses.replace(cfg, data=data, train=train)


def _enum_choices(e: OmegaConfBaseException) -> str | None:
    """The message for a bad enum value, listing the values users write (`python-docs`);
    OmegaConf's own lists the member names (`python_docs`). None for any other error."""
    cls, key = getattr(e, "object_type", None), getattr(e, "key", None)
    if not (isinstance(e, ValidationError) and dataclasses.is_dataclass(cls) and key):
        return None
    kind = typing.get_type_hints(cls).get(str(key))
    if not (isinstance(kind, type) and issubclass(kind, enum.Enum)):
        return None
    choices = ", ".join(str(member.value) for member in kind)
    return f"Invalid value '{e.value}', expected one of [{choices}]"


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a config file (with its defaults), applies overrides, and validates it."""
    nodes = read_yaml_tree(Path(path)) if path is not None else []
    source = str(path) if path is not None else "defaults"
    cfg = _merge(nodes, overrides, source)
    validate(cfg)
    return cfg


def from_dict(tree: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Builds a validated config from a plain nested dict (for example a saved config)."""
    cfg = _merge([OmegaConf.create(tree)], overrides, "dict")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON-able values (enums as their values, as YAML spells them)."""
    return _plain(OmegaConf.to_container(OmegaConf.structured(cfg)))


def _plain(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    return tree.value if isinstance(tree, enum.Enum) else tree


def portable(cfg: Config) -> Config:
    """cfg without this launch's process layout (`distributed`), as saved in run directories
    and checkpoints: a saved config must not make a later command wait for a coordinator."""
    return dataclasses.replace(cfg, distributed=DistributedConfig())


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Returns cfg with fields of some sections replaced: replace(cfg, train={"steps": 5})."""
    updates = {name: dataclasses.replace(getattr(cfg, name), **kv) for name, kv in sections.items()}
    new = dataclasses.replace(cfg, **updates)
    validate(new)
    return new


def load_files(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Loads several config files merged in order (each after its own defaults), then overrides.

    `load_files([experiment, preset])` runs an experiment with another model preset: the later
    file's keys win. Validated like `load`.
    """
    nodes = [node for path in paths for node in read_yaml_tree(Path(path))]
    cfg = _merge(nodes, overrides, " + ".join(str(p) for p in paths))
    validate(cfg)
    return cfg
