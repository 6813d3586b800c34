"""Context parallelism: the load-balanced row order, and every context mesh computes what one
device computes (losses, gradients, parameters, evaluation), with the sequence really split."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import CONFIGS
from test_train import _fixed_batch

from flaxlm import config, memory
from flaxlm.config import ConfigError
from flaxlm.context_parallel import inverse, load_balanced_order
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer, loss_sums


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_load_balanced_order_gives_every_shard_the_same_causal_work(shards):
    length = 64
    order_T = load_balanced_order(length, shards)
    assert sorted(order_T) == list(range(length))
    per_shard_SxP = order_T.reshape(shards, -1)
    chunk = length // (2 * shards)
    for i, positions in enumerate(per_shard_SxP):
        # One early and one late chunk: i and 2C - 1 - i.
        assert set(positions // chunk) == {i, 2 * shards - 1 - i}
    # Query t attends to t + 1 keys: each shard's total is the same.
    work = (per_shard_SxP + 1).sum(axis=1)
    assert (work == work[0]).all()
    # A plain split would not be: its last shard does 2C - 1 times its first shard's work.
    plain = (np.arange(length).reshape(shards, -1) + 1).sum(axis=1)
    assert plain[-1] > plain[0]
    x = np.arange(length) * 10
    np.testing.assert_array_equal(x[order_T][inverse(order_T)], x)
    assert load_balanced_order(length, 1) is None
    assert load_balanced_order(36, 4) is None  # 8 chunks do not divide 36


def _trainer(cfg, mesh: dict) -> Trainer:
    sizes = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, "expert": 1, **mesh}
    cfg = config.replace(cfg, mesh=sizes)
    return Trainer(cfg, make_mesh(cfg, jax.devices()[: int(np.prod(list(sizes.values())))]))


def _three_steps(cfg, mesh: dict):
    trainer = _trainer(cfg, mesh)
    state = trainer.init_state(0)
    losses = []
    for step in range(3):
        state, metrics = trainer.step(state, trainer.global_batch(_fixed_batch(trainer.cfg, step)))
        losses.append(float(metrics["loss"]))
    evaluated = trainer.eval_step(state.params, trainer.global_batch(_fixed_batch(cfg, 9)))
    return state, losses, {k: float(v) for k, v in evaluated.items()}


def _assert_same_training(cfg, meshes: dict[str, dict]):
    ref_state, ref_losses, ref_eval = _three_steps(cfg, {})
    ref_params = jax.device_get(ref_state.params)
    for name, mesh in meshes.items():
        state, losses, evaluated = _three_steps(cfg, mesh)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=name)
        for key, value in ref_eval.items():
            np.testing.assert_allclose(evaluated[key], value, rtol=2e-5, err_msg=f"{name} {key}")
        jax.tree.map(
            lambda a, b, n=name: np.testing.assert_allclose(a, b, atol=1e-4, err_msg=n),
            jax.device_get(state.params),
            ref_params,
        )


CONTEXT_MESHES = {
    "context=4": {"context": 4},
    "fsdp=2 x context=2 x tensor=2": {"fsdp": 2, "context": 2, "tensor": 2},
    "data=2 x context=4": {"data": 2, "context": 4},
}


def test_every_context_mesh_gives_the_same_losses_parameters_and_evaluation(tiny_cfg):
    # Llama blocks (rope, grouped-query attention with 2 key/value heads), two packed
    # documents per row (segment ids and restarting positions).
    cfg = tiny_cfg(
        "model.n_heads=8", "model.n_kv_heads=2", "optimizer.warmup_steps=0", family="llama"
    )
    _assert_same_training(cfg, CONTEXT_MESHES)


@pytest.mark.slow
def test_learned_positions_and_a_sliding_window_split_over_context(tiny_cfg):
    # GPT-2 (learned positions, tied embeddings) with Mistral's window, shorter than a row.
    cfg = tiny_cfg("model.sliding_window=12", "optimizer.warmup_steps=0")
    # Eight shards: 16 chunks of 4 positions, so the window spans chunks of three shards.
    _assert_same_training(cfg, {"context=8": {"context": 8}})


def test_gradients_of_a_context_mesh_equal_one_device(tiny_cfg):
    cfg = tiny_cfg("model.n_kv_heads=2", "data.global_batch_size=4", family="llama")
    grads = []
    for mesh in ({}, {"context": 4, "tensor": 2}):
        trainer = _trainer(cfg, mesh)
        state = trainer.init_state(0)
        batch = trainer.global_batch(_fixed_batch(trainer.cfg, 0))
        grad_fn = jax.jit(jax.grad(lambda p, b, m=trainer.model: loss_sums(p, m, b, 1e-4)[0]))
        with trainer.context():
            grads.append(jax.device_get(grad_fn(state.params, batch)))
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[0]))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6 * largest), grads[1], grads[0]
    )


@pytest.mark.slow
def test_splash_per_context_shard_equals_xla_on_one_device(tiny_cfg):
    long = ("data.seq_len=256", "model.max_seq_len=256", "optimizer.warmup_steps=0")
    ref = _three_steps(tiny_cfg(*long, family="llama"), {})[1]
    splash = tiny_cfg(*long, "model.attention=splash", family="llama")
    for mesh in ({"context": 2}, {"data": 2, "context": 2, "tensor": 2}):
        np.testing.assert_allclose(_three_steps(splash, mesh)[1], ref, rtol=2e-5, err_msg=mesh)


def test_the_sequence_is_split_in_the_compiled_step_and_the_memory_model(tiny_cfg):
    # One long row: only the context axis can split it.
    cfg = tiny_cfg(
        "data.global_batch_size=1", "data.seq_len=1024", "model.max_seq_len=1024",
        "model.n_layers=4", "model.scan_layers=true", family="llama",
    )  # fmt: skip
    temps, activations = [], []
    for mesh in ({}, {"context": 8}):
        trainer = _trainer(cfg, mesh)
        compiled = trainer.compile_step()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
        estimate = memory.estimate(trainer.cfg, trainer.abstract_state, dict(trainer.mesh.shape))
        activations.append(estimate.activations)
        hlo = compiled.as_text()
    # Keys and values are all-gathered per layer; every activation holds 1/8 of the row.
    assert "all-gather" in hlo
    assert temps[1] < 0.3 * temps[0], temps
    assert activations[1] < 0.3 * activations[0], activations


def test_context_settings_the_rows_cannot_take_are_named(tiny_cfg):
    with pytest.raises(ConfigError, match=r"mesh\.context=4 needs data\.seq_len=68 to be a multi"):
        tiny_cfg("mesh.fsdp=1", "mesh.context=4", "data.seq_len=68", "model.max_seq_len=68")
    with pytest.raises(ConfigError, match=r"splash with mesh\.context=2 needs data\.seq_len=128"):
        tiny_cfg(
            "mesh.fsdp=1", "mesh.context=2", "model.attention=splash",
            "data.seq_len=128", "model.max_seq_len=128",
        )  # fmt: skip


@pytest.mark.slow
def test_long_rows_pack_train_over_context_and_evaluate_as_on_one_device(tmp_path, corpus_cache):
    from helpers import flaxlm, train_tiny

    from flaxlm.data import pipeline

    # Documents of 50 to 800 bytes, many to a 2K row.
    rng = np.random.default_rng(0)
    words = ["context", "parallel", "attention", "packing", "row", "token", "shard"]
    for split, count in (("train", 400), ("eval", 60)):
        docs = [" ".join(rng.choice(words, rng.integers(8, 100))) for _ in range(count)]
        lines = [json.dumps({"text": doc}) for doc in docs]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    long = (
        "data.seq_len=2048", "model.max_seq_len=2048", "data.global_batch_size=2",
        "data.eval_batches=2", "model.n_layers=2", "data.corpus=files",
        f"data.train_files={tmp_path / 'train.jsonl'}",
        f"data.eval_files={tmp_path / 'eval.jsonl'}",
    )  # fmt: skip
    # Packing at 2K: full rows of several documents, each one's positions restarting at 0.
    cfg = config.load(CONFIGS / "tiny.yaml", [f"data.cache_dir={corpus_cache}", *long])
    batch = next(pipeline.train_iterator(cfg.data, seed=0))
    segments_BxT, positions_BxT = batch["segment_ids"], batch["positions"]
    assert (segments_BxT > 0).mean() > 0.95 and (np.diff(segments_BxT, axis=1) >= 0).all()
    assert (segments_BxT.max(axis=1) > 3).all()
    new_document_BxT = np.diff(segments_BxT, axis=1, prepend=0) != 0
    expected_BxT = np.zeros_like(positions_BxT)
    for t in range(1, positions_BxT.shape[1]):
        expected_BxT[:, t] = np.where(new_document_BxT[:, t], 0, expected_BxT[:, t - 1] + 1)
    real_BxT = segments_BxT > 0
    np.testing.assert_array_equal(positions_BxT[real_BxT], expected_BxT[real_BxT])

    # Train over fsdp 2 x context 4; the in-training evaluation (on that mesh) equals
    # `flaxlm eval` of the checkpoint on one device.
    run = tmp_path / "long"
    train_tiny(
        run, corpus_cache, *long, "mesh.fsdp=2", "mesh.context=4", "train.steps=4",
        "train.eval_every=4", "checkpoint.every_steps=4", "train.sample_prompt=",
    )  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    during = [r["eval_loss"] for r in records if r.get("step") == 4 and "eval_loss" in r][-1]
    proc = flaxlm("eval", "--checkpoint", str(run), f"data.cache_dir={corpus_cache}", devices=1)
    assert json.loads(proc.stdout.strip())["loss"] == pytest.approx(during, rel=1e-5)
