"""Device meshes and logical-axis sharding.

The mesh has three axes, `data`, `fsdp` and `tensor`, sized by `MeshConfig` (one may be -1 to
take the remaining devices). `MeshConfig.rules` maps logical axis names (as carried by parameters
and activations) to mesh axes; this module turns those names into `NamedSharding`s. Going from
data parallel to FSDP to tensor parallel is therefore a config change only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flaxlm.config import MESH_AXES, Config, ConfigError, MeshConfig, check_divisibility


def resolve_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with the -1 axis filled; errors name the axes and the device count."""
    sizes = mesh_cfg.shape()
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fill = [a for a, s in sizes.items() if s == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {_describe(sizes)} cannot use {num_devices} devices: the fixed axes "
                f"multiply to {fixed}, which does not divide {num_devices}"
            )
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh {_describe(sizes)} has {math.prod(sizes.values())} devices but "
            f"{num_devices} are available; make the product equal {num_devices} or set one "
            "axis to -1"
        )
    return sizes


def _describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{a}={s}" for a, s in sizes.items())


def make_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the device mesh for cfg and checks that it divides every sharded dimension."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_shape(cfg.mesh, len(devices))
    check_divisibility(cfg, sizes)
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        # Lays the axes out along the physical interconnect on TPUs; a plain reshape elsewhere.
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        device_array = np.asarray(devices).reshape(shape)
    # Auto axes: sharding follows the constraints we place (GSPMD); jax's default here is Explicit.
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(cfg: Config) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rules table in the form flax.linen's logical partitioning functions expect."""
    rules = []
    for logical, axes in cfg.mesh.rules.items():
        axes = tuple(axes)
        rules.append((logical, axes[0] if len(axes) == 1 else (axes or None)))
    return tuple(rules)


def logical_to_sharding(logical_tree, mesh: Mesh, cfg: Config):
    """Maps a tree of logical PartitionSpecs to NamedShardings on mesh."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, logical_rules(cfg))


def batch_sharding(mesh: Mesh, cfg: Config) -> NamedSharding:
    """Sharding of (batch, length) input arrays: the batch over its mesh axes."""
    spec = nn.logical_to_mesh_axes(("batch", "length"), logical_rules(cfg))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
