"""The building blocks of the config checks, shared by `validation` and the sections that
check themselves (`moe`): one rule, and one rule over several keys of a section."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flaxlm.config.enums import ConfigError


def require(ok: bool, message: str) -> None:
    """ConfigError(message) unless ok; the message names the key, the value and the fix."""
    if not ok:
        raise ConfigError(message)


def require_each(
    section: Any, where: str, keys: Iterable[str], ok: Callable[[Any], bool], rule: str
) -> None:
    """`require(ok(value))` for each of `keys` of a config section, with the message
    "{where}.{key}={value} {rule}" (e.g. "model.d_model=0 must be positive")."""
    for key in keys:
        value = getattr(section, key)
        require(ok(value), f"{where}.{key}={value} {rule}")
