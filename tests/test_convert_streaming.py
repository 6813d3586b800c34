"""Streaming conversion: sharded bfloat16 safetensors in, sharded safetensors with an index out,
bit for bit, with parameters placed straight into their shards (scanned or not)."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flaxlm import convert  # noqa: E402
from flaxlm.convert.safetensors_io import INDEX, LazySafetensors, write_sharded  # noqa: E402
from flaxlm.run_dir import load_run  # noqa: E402


def test_safetensors_writer_and_lazy_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "b": rng.standard_normal(7).astype(np.float32),
        "c": rng.integers(0, 9, (2, 2)).astype(np.int64),
    }
    files = write_sharded(iter(tensors.items()), tmp_path, max_shard_bytes=40)
    assert len(files) == 3 and (tmp_path / INDEX).is_file()
    index = json.loads((tmp_path / INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    lazy = LazySafetensors(tmp_path)
    assert set(lazy) == set(tensors)
    for name, value in tensors.items():
        assert lazy[name].dtype == value.dtype
        np.testing.assert_array_equal(lazy[name], value)
    # transformers' own reader agrees (safetensors, torch).
    from safetensors.torch import load_file

    assert load_file(tmp_path / files[0])["a"].dtype == torch.bfloat16


def test_the_writer_holds_one_tensor_at_a_time_whatever_the_shard_size(tmp_path, monkeypatch):
    import tracemalloc

    from flaxlm.convert import safetensors_io

    monkeypatch.setattr(safetensors_io, "_COPY_CHUNK", 2**20)
    tensor_bytes, count = 4 * 2**20, 16

    def tensors():  # each made when asked for, as the exporter does
        for i in range(count):
            yield f"layer.{i}", np.full(tensor_bytes // 4, i, np.float32)

    tracemalloc.start()
    try:
        files = write_sharded(tensors(), tmp_path, max_shard_bytes=2**40)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One 4 MiB tensor and a 1 MiB copy buffer, never the 64 MiB of the one shard.
    assert peak < 2 * tensor_bytes, peak
    assert files == ["model.safetensors"] and sorted(p.name for p in tmp_path.iterdir()) == files
    lazy = LazySafetensors(tmp_path)
    for i in range(count):
        np.testing.assert_array_equal(lazy[f"layer.{i}"], np.full(tensor_bytes // 4, i))
    from safetensors.numpy import load_file

    assert load_file(tmp_path / files[0])["layer.3"][0] == 3


def _random_qwen2(directory):
    """A random bfloat16 Qwen2 saved as several safetensors shards; returns the model."""
    cfg = transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, max_shard_size="60KB")
    assert (directory / INDEX).is_file()
    return model


def _assert_same_model(directory, model):
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    original = model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for name, value in reloaded.state_dict().items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_bf16_checkpoint_converts_both_ways_bit_for_bit(tmp_path, scan):
    model = _random_qwen2(tmp_path / "hf")

    convert.from_hf(tmp_path / "hf", tmp_path / "run", [f"model.scan_layers={scan}"])
    run_cfg, _, params, _ = load_run(tmp_path / "run")
    assert run_cfg.model.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}

    _, files = convert.to_hf(tmp_path / "run", tmp_path / "out", max_shard_bytes=60_000)
    assert len(files) > 1 and (tmp_path / "out" / INDEX).is_file()
    _assert_same_model(tmp_path / "out", model)

    _, files = convert.to_hf(tmp_path / "run", tmp_path / "f32", dtype="float32")
    assert files == ["model.safetensors"]
    assert LazySafetensors(tmp_path / "f32")["lm_head.weight"].dtype == np.float32


@pytest.mark.slow
def test_a_two_process_job_exports_the_model_it_shards_across_both(tmp_path):
    """Each process holds half of every parameter (FSDP over both processes' devices); the
    layers are gathered one at a time and written once, bit for bit."""
    from helpers import flaxlm_processes

    model = _random_qwen2(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "run", ["model.scan_layers=true"])
    out = tmp_path / "out"
    procs = flaxlm_processes(
        2, 2, "convert", "to-hf", "--max-shard-size", "60000", str(tmp_path / "run"), str(out)
    )
    assert procs[0].stdout.count("wrote") == 1 and procs[1].stdout == ""
    assert (out / INDEX).is_file()
    _assert_same_model(out, model)
