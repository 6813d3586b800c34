"""Model options that must not change the function: kernels, remat, scan, precision, packing."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import _fixed_batch

from flaxlm.attention import dot_product_attention
from flaxlm.config import AttentionKernel
from flaxlm.losses import token_losses
from flaxlm.mesh import make_mesh
from flaxlm.model import Transformer
from flaxlm.objective import loss_sums
from flaxlm.train import Trainer


@pytest.mark.parametrize("t", [128, 384])  # 384: blocks of 128, not the default 512
def test_splash_kernel_matches_the_reference(t):
    rng = np.random.default_rng(0)
    b, n, kv, h = 2, 4, 2, 32
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, 60:] = 2  # two documents in row 0
    seg[1, 100:] = 0  # padding at the end of row 1
    args = (q, k, v, jnp.asarray(seg), jnp.asarray(seg))
    ref = dot_product_attention(*args, AttentionKernel.reference)
    got = dot_product_attention(*args, AttentionKernel.splash)
    real = seg != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5)


@pytest.mark.slow
def test_splash_train_step_under_a_mesh_matches_xla(tiny_cfg):
    results = []
    for kernel in ("xla", "splash"):
        cfg = tiny_cfg(
            f"model.attention={kernel}", "data.seq_len=128", "model.max_seq_len=128",
            "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", family="llama",
        )  # fmt: skip
        trainer = Trainer(cfg, make_mesh(cfg))
        state = trainer.init_state(0)
        for step in range(2):
            state, metrics = trainer.step(state, trainer.global_batch(_fixed_batch(cfg, step)))
        results.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5)


def _loss_and_grads(cfg, params, batch):
    model = Transformer(cfg.model)
    return jax.jit(jax.value_and_grad(lambda p: loss_sums(p, model, batch, 0.0)[0]))(params)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_compute_the_same_gradients(tiny_cfg, scan):
    base = tiny_cfg(f"model.scan_layers={scan}", family="llama")
    params = nn.meta.unbox(
        Transformer(base.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    batch = {k: jnp.asarray(v) for k, v in _fixed_batch(base).items()}
    ref_loss, ref_grads = _loss_and_grads(base, params, batch)
    for policy in ("full", "save_dots", "save_projections"):
        cfg = tiny_cfg(f"model.scan_layers={scan}", f"model.remat={policy}", family="llama")
        loss, grads = _loss_and_grads(cfg, params, batch)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6), policy
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_remat_policies_keep_fewer_activations(tiny_cfg):
    """What the forward pass saves for the backward pass shrinks as remat gets stronger."""
    from jax._src.ad_checkpoint import saved_residuals

    def saved_bytes(policy):
        cfg = tiny_cfg(f"model.remat={policy}", "model.n_layers=4", family="llama")
        model = Transformer(cfg.model)
        params = nn.meta.unbox(
            model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        )
        batch = {k: jnp.asarray(v) for k, v in _fixed_batch(cfg).items()}
        residuals = saved_residuals(lambda p: loss_sums(p, model, batch, 0.0)[0], params)
        # Parameters are inputs, kept either way; count the activations.
        return sum(a.size * a.dtype.itemsize for a, why in residuals if "argument" not in why)

    none, dots, names, full = (
        saved_bytes(p) for p in ("none", "save_dots", "save_projections", "full")
    )
    assert full < names < none and full < dots < none, (none, dots, names, full)


def test_scanned_layers_are_the_same_function(tiny_cfg):
    loop_cfg, scan_cfg = (
        tiny_cfg(family="llama"),
        tiny_cfg("model.scan_layers=true", family="llama"),
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)
    params = nn.meta.unbox(Transformer(loop_cfg.model).init(jax.random.key(0), tokens)["params"])
    n = loop_cfg.model.n_layers
    stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
    stacked["blocks"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[params[f"block_{i}"] for i in range(n)]
    )
    expected = Transformer(loop_cfg.model).apply({"params": params}, tokens)
    got = Transformer(scan_cfg.model).apply({"params": stacked}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    # The scanned parameters carry the `layers` logical axis first.
    boxed = jax.eval_shape(Transformer(scan_cfg.model).init, jax.random.key(0), tokens)["params"]
    assert boxed["blocks"]["attn"]["query"]["kernel"].names[0] == "layers"


def test_bfloat16_compute_tracks_float32(tiny_cfg):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_cfg(f"model.dtype={dtype}", "optimizer.warmup_steps=0", "data.seq_len=32")
        trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
        state = trainer.init_state(0)
        curve = []
        for step in range(20):
            state, metrics = trainer.step(state, trainer.global_batch(_fixed_batch(cfg, step % 4)))
            curve.append(float(metrics["loss"]))
        losses[dtype] = np.array(curve)
        # Master weights stay float32 whatever the compute dtype.
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_packed_batch_gives_each_document_its_own_loss(tiny_cfg):
    cfg = tiny_cfg(family="llama")
    model = Transformer(cfg.model)
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 256, n).astype(np.int32) for n in (9, 17, 6)]
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])

    def losses(tokens, positions, segments):
        batch = {
            "tokens": tokens[None],
            "positions": positions[None],
            "segment_ids": segments[None],
        }
        logits = model.apply(
            {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]
        )
        per_token, weights = token_losses(logits, batch)
        return np.asarray(per_token[0]), np.asarray(weights[0])

    packed = np.concatenate(docs)
    positions = np.concatenate([np.arange(len(d)) for d in docs])
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])
    got, weights = losses(packed, positions, segments)
    offset = 0
    for doc in docs:
        alone, _ = losses(doc, np.arange(len(doc)), np.ones(len(doc), np.int32))
        span = slice(offset, offset + len(doc) - 1)
        np.testing.assert_allclose(got[span], alone, atol=1e-5)
        assert weights[span].all()
        if offset + len(doc) - 1 < len(weights):
            assert weights[offset + len(doc) - 1] == 0  # no loss across the boundary
        offset += len(doc)
