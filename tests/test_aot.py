"""`flaxlm compile`: the train step compiled for TPU topologies that are not here (libtpu)."""

from __future__ import annotations

import json

import pytest
from helpers import flaxlm

from flaxlm import aot
from flaxlm.config import ConfigError

# TPU layouts pad small dimensions to tiles of 128: keep the model's dimensions multiples of it.
TILED = ("data.global_batch_size=16", "model.d_model=256", "model.d_ff=1024", "model.n_heads=2")


def test_compile_report_for_a_small_topology(tiny_cfg):
    cfg = tiny_cfg(*TILED)
    fsdp = aot.compile_report(cfg, "v5e:2x2")
    assert fsdp["devices"] == 4 and fsdp["mesh"] == {
        "data": 1,
        "fsdp": 4,
        "context": 1,
        "tensor": 1,
        "expert": 1,
    }
    assert fsdp["hbm_per_device_gib"] == 16 and fsdp["fits"]
    mem = fsdp["memory_per_device"]
    assert mem["total_gib"] >= mem["arguments_gib"] > 0
    # The train state is donated: its outputs reuse the argument buffers.
    assert mem["aliased_gib"] > 0
    # The device-local train state (exact in the estimate) must be among the arguments.
    est = fsdp["estimate_per_device"]
    assert mem["arguments_gib"] >= est["params_gib"] + est["optimizer_gib"]
    # XLA's count of the step's FLOPs over all devices agrees with 6N + 12LTd.
    xla_total = fsdp["xla_flops_per_device"] * fsdp["devices"]
    assert xla_total == pytest.approx(fsdp["analytic_flops_per_step"], rel=0.1)
    # Unrolled layers, no micro-batches: XLA's estimate covers the whole step, with the
    # iterations of any loop the compiler made (a windowed einsum) added.
    assert fsdp["xla_estimate"].startswith("the compiled step") and fsdp["xla_step_seconds"] > 0
    assert fsdp["xla_step_unknown_loops"] == 0
    assert fsdp["xla_step_flops_per_device"] >= fsdp["xla_flops_per_device"]

    # Replicating the state (pure data parallel) must cost about 4x the state memory per device.
    dp = aot.compile_report(tiny_cfg(*TILED, "mesh.data=4"), "v5e:2x2")
    dp_state = dp["estimate_per_device"]["params_gib"] + dp["estimate_per_device"]["optimizer_gib"]
    assert dp_state == pytest.approx(4 * (est["params_gib"] + est["optimizer_gib"]), rel=0.05)
    assert dp["memory_per_device"]["arguments_gib"] > 3 * mem["arguments_gib"]


def test_a_scanned_model_reports_the_flops_of_its_whole_step(tiny_cfg):
    layers = (*TILED, "model.n_layers=4")
    unrolled = aot.compile_report(tiny_cfg(*layers), "v5e:2x2")
    scanned = aot.compile_report(tiny_cfg(*layers, "model.scan_layers=true"), "v5e:2x2")
    want = unrolled["xla_step_flops_per_device"]
    assert scanned["xla_flops_per_device"] < 0.6 * want  # the loop body, counted once
    assert scanned["xla_step_flops_per_device"] == pytest.approx(want, rel=0.02)
    assert scanned["xla_estimate"].startswith(("extrapolated", "unavailable"))
    # The roofline reads the scanned program itself, its loop by its trip count: the same step
    # time as the unrolled one, on v5e too, where XLA gives no estimate.
    seconds = unrolled["roofline_step_seconds"]
    assert scanned["roofline_step_seconds"] == pytest.approx(seconds, rel=0.05)
    assert 0 < unrolled["roofline_mfu"] < 1


def test_xla_step_estimate_is_given_only_where_xla_has_one():
    seconds = aot._xla_step_estimate({"optimal_seconds": 0.5}, "the compiled step", 0.25)
    assert seconds == {"xla_step_seconds": 0.5, "xla_mfu": 0.5, "xla_estimate": "the compiled step"}
    for cost in ({"optimal_seconds": -2.0}, {"flops": 1.0}):
        report = aot._xla_step_estimate(cost, "the compiled step", 0.25)
        assert report["xla_step_seconds"] is None and report["xla_mfu"] is None
        assert report["xla_estimate"].startswith("unavailable")
    # Splash is a custom call XLA does not cost: the time is a floor and implies no MFU.
    splash = aot._xla_step_estimate({"optimal_seconds": 0.5}, "the compiled step", 0.25, True)
    assert splash["xla_step_seconds"] == 0.5 and splash["xla_mfu"] is None
    assert "a floor" in splash["xla_estimate"]


def test_bad_topologies_and_meshes_are_named(tiny_cfg):
    with pytest.raises(ConfigError, match="v5p:4x4x4"):
        aot.parse_topology("v5p-128")
    with pytest.raises(ConfigError, match="has 8 devices but 4 are available"):
        aot.compile_report(tiny_cfg("mesh.fsdp=8"), "v5e:2x2")


@pytest.mark.slow
def test_compile_command_for_two_slices(tmp_path, corpus_cache):
    proc = flaxlm(
        "compile",
        "--config",
        "configs/tiny.yaml",
        "--topology",
        "v5e:2x2",
        "--slices",
        "2",
        "mesh.dcn_data=2",
        f"data.cache_dir={corpus_cache}",
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["chips"] == 8 and report["mesh"] == {
        "data": 2,
        "fsdp": 4,
        "context": 1,
        "tensor": 1,
        "expert": 1,
    }
    assert report["fits"] is True
