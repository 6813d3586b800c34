"""Meshes over ICI x DCN axes, and joining multi-process jobs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from flaxlm import distributed
from flaxlm.config import ConfigError
from flaxlm.mesh import make_mesh, resolve_shape


def test_dcn_axes_multiply_the_ici_axes(tiny_cfg):
    cfg = tiny_cfg("mesh.fsdp=-1", "mesh.tensor=2", "mesh.dcn_data=2")
    # 16 devices in 2 slices: each slice has 8 = fsdp 4 x tensor 2; data spans the slices.
    assert resolve_shape(cfg.mesh, 16, num_slices=2) == {
        "data": 2,
        "fsdp": 4,
        "context": 1,
        "tensor": 2,
        "expert": 1,
    }
    with pytest.raises(ConfigError, match="multiplies to 2 but the job has 1 slice"):
        resolve_shape(cfg.mesh, 16, num_slices=1)
    with pytest.raises(ConfigError, match="has 4 devices but 6 are per slice"):
        resolve_shape(tiny_cfg("mesh.fsdp=2", "mesh.tensor=2", "mesh.dcn_data=2").mesh, 12, 2)


def test_a_dcn_mesh_needs_as_many_slices_as_it_names(tiny_cfg):
    # One process of CPU devices is one slice: two DCN slices cannot be formed.
    with pytest.raises(
        ConfigError, match=re.escape("mesh.dcn_* product equal the number of slices")
    ):
        make_mesh(tiny_cfg("mesh.dcn_fsdp=2"))


def test_dcn_sizes_are_validated_with_the_divisibility_of_the_whole_axis(tiny_cfg):
    with pytest.raises(ConfigError, match=re.escape("mesh.dcn_tensor=0 must be positive")):
        tiny_cfg("mesh.dcn_tensor=0")
    # tensor 4 (ICI) x 2 (DCN) = 8 does not divide the tiny model's 4 heads.
    with pytest.raises(
        ConfigError, match=re.escape("mesh.tensor=8 does not divide model.n_heads=4")
    ):
        tiny_cfg("mesh.fsdp=1", "mesh.tensor=4", "mesh.dcn_tensor=2")


def test_single_slice_mesh_keeps_the_requested_shape(tiny_cfg):
    mesh = make_mesh(tiny_cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2, "expert": 1}
    assert sorted(d.id for d in np.ravel(mesh.devices)) == list(range(8))


@pytest.mark.parametrize(
    ("env", "kind"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, "TPU pod"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ],
)
def test_cluster_environment_is_recognised(monkeypatch, env, kind):
    for name in (
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "JAX_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.cluster_environment() == kind


def test_single_process_does_not_join_and_explicit_settings_are_checked(tiny_cfg):
    assert distributed.initialize(tiny_cfg().distributed) is False
    with pytest.raises(ConfigError, match=re.escape("also set distributed.num_processes")):
        tiny_cfg("distributed.coordinator_address=127.0.0.1:1234")
    with pytest.raises(ConfigError, match="process_id=2 must be in"):
        tiny_cfg(
            "distributed.coordinator_address=127.0.0.1:1234",
            "distributed.num_processes=2",
            "distributed.process_id=2",
        )


def test_current_mesh_is_the_entered_mesh_also_while_tracing(tiny_cfg):
    import jax

    from flaxlm.mesh import current_mesh

    mesh = make_mesh(tiny_cfg())
    assert current_mesh() is None
    seen = []
    with mesh:
        assert current_mesh() is mesh
        jax.jit(lambda x: seen.append(current_mesh()) or x)(1.0)
    assert seen == [mesh]
    assert current_mesh() is None


def test_logical_axes_resolve_through_the_rules_table_to_mesh_axes_and_shard_counts(tiny_cfg):
    import flax.linen as nn

    from flaxlm.mesh import divides, logical_mesh_axes, logical_rules, shard_count

    cfg = tiny_cfg("mesh.fsdp=2", "mesh.context=2", "mesh.tensor=2")
    mesh = make_mesh(cfg)
    assert logical_mesh_axes("embed") == ()  # no rules are active
    with nn.logical_axis_rules(logical_rules(cfg)):
        embed = logical_mesh_axes("embed")
        assert set(embed) == {"fsdp", "context"} and shard_count(mesh, embed) == 4
        assert shard_count(mesh, logical_mesh_axes("mlp")) == 2
        assert shard_count(mesh, logical_mesh_axes("length")) == 2
        spec = nn.logical_to_mesh_axes(("embed", "mlp"))
    assert shard_count(mesh, None) == 1
    assert divides(mesh, spec, (8, 6)) and not divides(mesh, spec, (6, 6))
    assert not divides(mesh, spec, (8, 3))
