"""`flaxlm bench` and the sweeps: FLOPs against XLA, record consistency, memory, output files."""

from __future__ import annotations

import csv
import json
import math
import time

import jax
import matplotlib.image
import pytest
from conftest import CONFIGS, _llama_overrides
from helpers import flaxlm

from flaxlm import config
from flaxlm.bench import bench
from flaxlm.config import ConfigError
from flaxlm.flops import analytic_param_count, flops_per_token, sustained_matmul_flops
from flaxlm.mesh import make_mesh
from flaxlm.sweep import mesh_sweep, model_sweep, parse_mesh, write_sweep
from flaxlm.train import Trainer

# The analytic count (6N + 12 L T d per token) leaves out what is not a matmul (norms, softmax,
# GELU, the optimizer update) and counts the embedding lookups as matmuls; for models where the
# matmuls dominate (d_model >= 256) it lies within this of XLA's count of the compiled step.
FLOPS_TOLERANCE = 0.05

MATMUL_BOUND = [
    "model.d_model=256",
    "model.n_heads=4",
    "model.d_ff=1024",
    "model.n_layers=2",
    "model.max_seq_len=128",
    "data.seq_len=128",
]
LLAMA = [
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.position=rope",
    "model.n_kv_heads=2",
    "model.tie_embeddings=false",
    "model.use_bias=false",
]


def _cfg(*overrides: str):
    return config.load(CONFIGS / "tiny.yaml", list(overrides))


@pytest.mark.parametrize(
    ("family", "mesh", "devices"),
    [("gpt2", ["mesh.fsdp=1"], 1), ("llama", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8)],
)
def test_analytic_flops_agree_with_xla_and_memory_with_the_state(family, mesh, devices):
    cfg = _cfg(*MATMUL_BOUND, *(LLAMA if family == "llama" else []), *mesh)
    used = jax.devices()[:devices]
    r = bench(cfg, steps=2, warmup=1, devices=used)

    # XLA's FLOPs of the partitioned program (per device, times the devices) against 6N + attention.
    assert r["xla_flops_per_step"] > 0
    assert r["model_flops_per_step"] == pytest.approx(r["xla_flops_per_step"], rel=FLOPS_TOLERANCE)

    # Compiled memory: the arguments are exactly this device's shards of the train state and the
    # batch, and the donated state is aliased to the output.
    trainer = Trainer(cfg, make_mesh(cfg, used))
    state_bytes = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(trainer.abstract_state)
    )
    batch_shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    batch_bytes = 3 * math.prod(trainer.batch_sharding.shard_shape(batch_shape)) * 4
    assert r["memory_argument_bytes"] == state_bytes + batch_bytes
    assert r["memory_alias_bytes"] == state_bytes
    assert r["memory_per_device_bytes"] >= r["memory_argument_bytes"] + r["memory_temp_bytes"]


def _check_consistent(r: dict, cfg, devices: int, peak_per_device: float) -> None:
    """The fields of one bench record agree with each other and with the config."""
    tokens = r["global_batch_size"] * cfg.data.seq_len
    n = analytic_param_count(cfg.model)
    assert r["params"] == n and r["devices"] == devices
    assert r["tokens_per_step"] == tokens
    assert r["step_seconds_min"] <= r["step_seconds_p10"] <= r["step_seconds"]
    assert r["step_seconds"] <= r["step_seconds_p90"] <= r["step_seconds_max"]
    assert r["tokens_per_second"] == pytest.approx(tokens / r["step_seconds"])
    assert r["tokens_per_second_per_device"] == pytest.approx(r["tokens_per_second"] / devices)
    assert r["model_flops_per_step"] == flops_per_token(cfg.model, n, cfg.data.seq_len) * tokens
    assert r["model_flops_per_second"] == pytest.approx(
        r["model_flops_per_step"] / r["step_seconds"]
    )
    # A configured peak is per device: the job's peak is that times the devices.
    assert r["peak_flops_per_second"] == peak_per_device * devices
    assert r["mfu"] == pytest.approx(r["model_flops_per_second"] / r["peak_flops_per_second"])
    assert math.isfinite(r["final_loss"])


def test_bad_bench_inputs_fail_early():
    with pytest.raises(ConfigError, match="DATAxFSDPxTENSOR"):
        parse_mesh("2x2")
    assert parse_mesh("2x4x1") == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1, "expert": 1}
    assert parse_mesh("1x2x1x1x4")["context"] == 4
    assert parse_mesh("1x2x1x4")["expert"] == 4
    with pytest.raises(ConfigError, match="needs 16 devices but 8"):
        list(mesh_sweep(_cfg(), ["4x4x1"]))
    with pytest.raises(ConfigError, match="--steps >= 1"):
        bench(_cfg(), steps=0)


def test_mesh_sweep_writes_a_row_per_mesh_and_a_plot(tmp_path):
    cfg = _cfg("train.peak_flops_per_device=1e12")
    # Weak scaling: 4 rows per batch shard.
    records = list(mesh_sweep(cfg, ["1x1x1", "1x2x2"], steps=3, warmup=1, per_device_batch=4))
    assert [r["global_batch_size"] for r in records] == [4, 8]
    _check_consistent(records[0], cfg, devices=1, peak_per_device=1e12)
    _check_consistent(records[1], cfg, devices=4, peak_per_device=1e12)
    paths = write_sweep(records, tmp_path, "mesh")
    assert [p.name for p in paths] == ["mesh.csv", "mesh.json", "mesh.png"]
    with (tmp_path / "mesh.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["mesh_spec"] for r in rows] == ["1x1x1", "1x2x2"]
    assert [int(r["devices"]) for r in rows] == [1, 4]
    assert [(int(r["mesh.fsdp"]), int(r["mesh.tensor"])) for r in rows] == [(1, 1), (2, 2)]
    assert float(rows[1]["tokens_per_second"]) == pytest.approx(records[1]["tokens_per_second"])
    assert json.loads((tmp_path / "mesh.json").read_text()) == records
    height, width, _ = matplotlib.image.imread(tmp_path / "mesh.png").shape
    assert height > 100 and width > 100


@pytest.mark.slow
def test_model_sweep_benchmarks_each_preset(tmp_path):
    presets = [CONFIGS / "models" / "gpt2-tiny.yaml", CONFIGS / "models" / "llama-tiny.yaml"]
    records = list(model_sweep(CONFIGS / "tiny.yaml", presets, ["mesh.fsdp=8"], steps=2, warmup=1))
    write_sweep(records, tmp_path, "models")
    with (tmp_path / "models.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model_name"] for r in rows] == ["gpt2-tiny", "llama-tiny"]
    # The presets merged over tiny.yaml are the same models as tiny.yaml with their keys set.
    expected = [config.load(CONFIGS / "tiny.yaml"), _cfg(*_llama_overrides())]
    for cfg, row in zip(expected, rows, strict=True):
        assert int(row["params"]) == analytic_param_count(cfg.model)
    assert rows[0]["params"] != rows[1]["params"]
    assert (tmp_path / "models.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_command_prints_one_json_line():
    proc = flaxlm(
        "bench", "--config", str(CONFIGS / "tiny.yaml"), "--steps", "3", "--warmup", "1", devices=1
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["devices"] == 1 and record["steps"] == 3
    # The peak is float32 matmuls measured beside the steps: a train step cannot beat it.
    assert record["peak_source"] == "float32 matmul measured in-process"
    assert 0 < record["mfu"] < 1


def test_bad_sweep_arguments_exit_with_status_2(tmp_path, capsys):
    from flaxlm.cli import main

    tiny = str(CONFIGS / "tiny.yaml")
    out = ["--out", str(tmp_path / "sweep")]
    assert main(["sweep", "mesh", "--config", tiny, "--meshes", "3x3x3", *out]) == 2
    assert "needs 27 devices but 8 are available" in capsys.readouterr().err
    assert main(["sweep", "models", "--config", tiny]) == 2
    assert "needs --models" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()  # nothing written by a refused sweep


def test_sustained_matmul_rate_is_measured_over_the_time_asked():
    start = time.perf_counter()
    rate = sustained_matmul_flops(0.3, n=256)
    assert time.perf_counter() - start >= 0.3
    assert 1e6 < rate < 1e15  # FLOP/s of a CPU, not a unit mistake
