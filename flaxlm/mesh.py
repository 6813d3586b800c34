"""Device meshes and logical-axis sharding.

The mesh has five axes, `data`, `fsdp`, `context` (the sequence of activations is split over
it; `flaxlm.context_parallel`), `tensor` and `expert` (mixture-of-experts layers only: routed
experts and the batch are split over it), each sized by `MeshConfig` for ICI
(within a slice; one axis may be -1 to take the slice's remaining devices) times DCN (across
slices, outermost). `MeshConfig.rules` maps logical axis names (as carried by parameters and
activations) to mesh axes; this module turns those names into `NamedSharding`s. Going from data
parallel to FSDP to tensor parallel, or to several slices, is therefore a config change only.
`current_mesh()` gives the mesh that the caller entered with `with mesh:` (the train step, AOT
compilation), for code that must know it while tracing: kernels that run per shard, the choice
of what to compile for, and `logical_constraint`, which pins activations to that mesh.
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


def resolve_shape(mesh_cfg: MeshConfig, num_devices: int, num_slices: int = 1) -> dict[str, int]:
    """Devices along each mesh axis (ICI x DCN), with the -1 axis filled.

    `num_devices` counts every device of the job; the DCN sizes must multiply to `num_slices`,
    and the ICI sizes to the devices of one slice. Errors name the axes and the counts.
    """
    dcn = mesh_cfg.dcn_shape()
    if math.prod(dcn.values()) != num_slices:
        raise ConfigError(
            f"mesh {_describe(dcn, 'dcn_')} multiplies to {math.prod(dcn.values())} but the job "
            f"has {num_slices} slice(s) (TPU slices, or processes where devices carry no slice "
            "index); make the mesh.dcn_* product equal the number of slices"
        )
    per_slice = num_devices // num_slices
    sizes = mesh_cfg.shape()
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fill = [a for a, s in sizes.items() if s == -1]
    where = "per slice" if num_slices > 1 else "available"
    if fill:
        if per_slice % fixed:
            raise ConfigError(
                f"mesh {_describe(sizes)} cannot use {per_slice} devices {where}: the fixed axes "
                f"multiply to {fixed}, which does not divide {per_slice}"
            )
        sizes[fill[0]] = per_slice // fixed
    if math.prod(sizes.values()) != per_slice:
        raise ConfigError(
            f"mesh {_describe(sizes)} has {math.prod(sizes.values())} devices but {per_slice} are "
            f"{where}; make the product equal {per_slice} or set one axis to -1"
        )
    return {a: sizes[a] * dcn[a] for a in MESH_AXES}


def _describe(sizes: dict[str, int], prefix: str = "") -> str:
    # The expert and context axes are named only when used: most meshes have neither.
    shown = {a: s for a, s in sizes.items() if a not in ("expert", "context") or s != 1}
    return " x ".join(f"{prefix}{a}={s}" for a, s in shown.items())


def _slices(devices: Sequence[jax.Device]) -> tuple[int, bool]:
    """(number of slices, whether they are processes): TPU slices by their slice index,
    otherwise each process is a slice (GPU hosts, CPU processes)."""
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", None) or 0 for d in devices}), False
    return len({d.process_index for d in devices}), True


def make_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the device mesh for cfg and checks that it divides every sharded dimension.

    With DCN axes > 1 the mesh is hybrid: `mesh_utils.create_hybrid_device_mesh` keeps the ICI
    part of each axis inside a slice, so only the DCN part of an axis crosses slices.
    """
    devices = list(devices) if devices is not None else jax.devices()
    dcn = cfg.mesh.dcn_shape()
    num_slices = math.prod(dcn.values())
    found_slices, process_is_granule = _slices(devices) if num_slices > 1 else (1, False)
    sizes = resolve_shape(cfg.mesh, len(devices), found_slices)
    check_divisibility(cfg, sizes)
    ici_shape = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
    dcn_shape = tuple(dcn[a] for a in MESH_AXES)
    if num_slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape,
            dcn_shape,
            devices,
            process_is_granule=process_is_granule,
            allow_split_physical_axes=True,
        )
    else:
        try:
            # Lays the axes out along the physical interconnect on TPUs; a reshape elsewhere.
            device_array = mesh_utils.create_device_mesh(
                ici_shape, devices, allow_split_physical_axes=True
            )
        except (ValueError, NotImplementedError, AssertionError):
            device_array = np.asarray(devices).reshape(ici_shape)
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
    """Sharding of (batch, length) input arrays: the batch over its mesh axes, each row whole.

    Rows stay whole under context parallelism too: each process feeds whole rows, and the
    model reorders a row's tokens for the context shards locally (a few integers per token).
    """
    spec = nn.logical_to_mesh_axes(("batch", None), logical_rules(cfg))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def current_mesh() -> Mesh | None:
    """The mesh of the enclosing `with mesh:` block, or None outside one; usable while tracing.

    JAX 0.10 has no public accessor for the mesh a `with mesh:` block enters:
    `jax.sharding.get_mesh()` and `get_abstract_mesh()` only see `jax.set_mesh`, and
    `jax.interpreters.pxla.thread_resources` is deprecated. So the one private access lives here.
    """
    from jax._src.mesh import thread_resources

    mesh = thread_resources.env.physical_mesh
    return None if mesh.empty else mesh


def current_platform() -> str:
    """The platform being compiled for: the enclosing mesh's (AOT compilation for a TPU
    topology runs in a CPU process), else the default backend."""
    mesh = current_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def logical_constraint(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """x constrained to the sharding that the logical `names` map to, on the current mesh.

    A no-op outside a `with mesh:` block or a `nn.logical_axis_rules` context, on a one-device
    mesh, and where the mesh does not divide x (`model.init` traces a batch of one).
    The mesh is passed explicitly: Flax's `nn.with_logical_constraint` without one acts only
    under an abstract mesh (`jax.set_mesh`), so inside `with mesh:` it silently does nothing.
    Setting the abstract mesh instead is no option either: Flax then also constrains every
    logically partitioned parameter as it is unboxed, and `nn.DenseGeneral` unboxes its kernel
    while it is still flat (rank 2 against 3 names), which fails to trace.
    """
    mesh = current_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh is None or mesh.size == 1 or not rules:
        return x
    spec = nn.logical_to_mesh_axes(names, rules)
    if not divides(mesh, spec, x.shape):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def spec_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry: None, one name or a tuple of names."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def shard_count(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
    """Into how many pieces one PartitionSpec entry splits its dimension on mesh."""
    return math.prod(mesh.shape[name] for name in spec_axes(entry))


def logical_mesh_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to under the active rules (() when unmapped or
    outside a `nn.logical_axis_rules` context)."""
    rules = nn.get_logical_axis_rules()
    return spec_axes(nn.logical_to_mesh_axes((logical,), rules)[0]) if rules else ()


def divides(mesh: Mesh, spec: PartitionSpec, shape: tuple[int, ...]) -> bool:
    """Whether every dimension of shape is a multiple of the mesh axes spec shards it over."""
    return all(dim % shard_count(mesh, entry) == 0 for dim, entry in zip(shape, spec, strict=False))
