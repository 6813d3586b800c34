"""Mixture-of-experts: routing and both dispatches against a per-token loop, the router
statistics, and training with the router losses."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.config import ModelConfig, MoeConfig, MoeDispatch, Router
from flaxlm.moe import routed_experts

E, K, D, F, Q = 6, 2, 8, 12, 40


def _cfg(**moe) -> ModelConfig:
    base = dict(num_experts=E, experts_per_token=K)
    return ModelConfig(d_model=D, d_ff=F, mlp="swiglu", moe=MoeConfig(**{**base, **moe}))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((Q, D)).astype(np.float32)
    router = rng.standard_normal((D, E)).astype(np.float32)
    w = {
        "gate": rng.standard_normal((E, D, F)).astype(np.float32) * 0.3,
        "up": rng.standard_normal((E, D, F)).astype(np.float32) * 0.3,
        "down": rng.standard_normal((E, F, D)).astype(np.float32) * 0.3,
    }
    return x, router, w


def _oracle(x, router, w, moe: MoeConfig, capacity=None):
    """Token by token, choice-major when a capacity limits each expert: the definition."""
    logits = x.astype(np.float64) @ router
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = np.zeros_like(x, dtype=np.float64)
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    gates = np.take_along_axis(probs, chosen, 1)
    if moe.router == Router.topk_softmax or moe.normalize_gates:
        gates = gates / gates.sum(1, keepdims=True)
    used = np.zeros(E, int)
    for choice in range(K):
        for q in range(len(x)):
            e = chosen[q, choice]
            if capacity is not None and used[e] >= capacity:
                continue
            used[e] += 1
            h = x[q] @ w["gate"][e]
            h = h / (1 + np.exp(-h)) * (x[q] @ w["up"][e])
            y[q] += gates[q, choice] * (h @ w["down"][e])
    return y


@pytest.mark.parametrize(
    "moe",
    [
        dict(router="topk_softmax"),
        dict(router="softmax_topk"),
        dict(router="softmax_topk", normalize_gates=True),
    ],
)
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_dispatch_equals_the_per_token_loop(moe, dispatch):
    cfg = _cfg(**moe, dispatch=dispatch, capacity_factor=0.0)  # 0: no capacity limit
    x, router, w = _inputs()
    y, stats = jax.jit(lambda *a: routed_experts(*a, cfg))(x, router, w)
    np.testing.assert_allclose(y, _oracle(x, router, w, cfg.moe), atol=2e-5, rtol=1e-5)
    assert float(stats["dropped"]) == 0.0


def test_capacity_drops_the_overflow_choice_major():
    cfg = _cfg(dispatch="capacity", capacity_factor=0.5)
    x, router, w = _inputs(1)
    capacity = int(np.ceil(0.5 * Q * K / E))
    y, stats = jax.jit(lambda *a: routed_experts(*a, cfg))(x, router, w)
    expected = _oracle(x, router, w, cfg.moe, capacity=capacity)
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    # At most E * capacity of the Q * K slots are served.
    assert float(stats["dropped"]) >= 1 - E * capacity / (Q * K) - 1e-6 > 0


def test_dropless_and_capacity_have_the_same_gradients():
    x, router, w = _inputs(2)

    def loss(x, router, w, dispatch):
        cfg = _cfg(dispatch=dispatch, capacity_factor=0.0)
        y, stats = routed_experts(x, router, w, cfg)
        return jnp.sum(y**2) + stats["aux_loss"] + stats["z_loss"]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    grads = [grad(x, router, w, d) for d in MoeDispatch]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), *grads)
    assert float(jnp.abs(grads[0][1]).max()) > 0  # the router learns


def test_router_statistics_of_a_uniform_router():
    x, _, w = _inputs()
    _, stats = routed_experts(x, np.zeros((D, E), np.float32), w, _cfg())
    # Uniform probabilities: the balance loss is 1 whatever the load; z = log(E)^2. Ties pick
    # the first K experts for every token: those carry E / K times their share, the rest none.
    np.testing.assert_allclose(stats["aux_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats["z_loss"], np.log(E) ** 2, rtol=1e-6)
    np.testing.assert_allclose(stats["load_max"], E / K, rtol=1e-6)
    assert float(stats["load_min"]) == 0.0


def test_moe_model_trains_and_logs_router_metrics(tiny_cfg):
    from flaxlm.mesh import make_mesh
    from flaxlm.train import Trainer

    cfg = tiny_cfg(
        "model.moe.num_experts=4",
        "model.moe.num_shared_experts=1",
        "model.moe.d_expert=64",
        "model.moe.first_dense_layers=1",
        "model.moe.z_loss_weight=1e-3",
        "data.global_batch_size=2",
        "data.seq_len=32",
        "optimizer.warmup_steps=0",
        family="llama",
    )
    trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
    params = trainer.abstract_state.params
    assert "router" not in params["block_0"]["mlp"] and "router" in params["block_1"]["mlp"]
    assert params["block_1"]["mlp"]["shared"]["up"]["kernel"].shape == (64, 64)
    state = trainer.init_state(0)
    batch = trainer.global_batch(trainer.synthetic_batch())
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert 0.9 < float(metrics["moe_aux_loss"]) < 4.0
    assert float(metrics["moe_z_loss"]) > 0
    assert float(metrics["moe_dropped"]) == 0.0
    assert float(metrics["moe_load_max"]) >= 1.0 >= float(metrics["moe_load_min"])


def test_bad_moe_settings_are_named(tiny_cfg):
    from flaxlm.config import ConfigError

    with pytest.raises(ConfigError, match=r"experts_per_token=5 exceeds model\.moe\.num_experts=4"):
        tiny_cfg("model.moe.num_experts=4", "model.moe.experts_per_token=5")
    with pytest.raises(ConfigError, match=r"model\.moe\.every=2 with model\.scan_layers=true"):
        tiny_cfg("model.moe.num_experts=4", "model.moe.every=2", "model.scan_layers=true")
    with pytest.raises(ConfigError, match=r"mesh\.expert=8 does not divide model\.moe\.num_exp"):
        tiny_cfg("model.moe.num_experts=4", "mesh.fsdp=1", "mesh.expert=8")
    assert MoeConfig().enabled is False


# (mesh, dispatch): capacity with no capacity limit drops nothing, so it must match too.
MOE_MESHES = {
    "expert=8": (dict(expert=8), "dropless"),
    "data=2 x fsdp=2 x expert=2": (dict(data=2, fsdp=2, expert=2), "dropless"),
    "tensor=2 x expert=4": (dict(tensor=2, expert=4), "dropless"),
    "fsdp=2 x expert=4, capacity": (dict(fsdp=2, expert=4), "capacity"),
    # Context parallelism: each device routes the tokens of its rows' positions.
    "fsdp=2 x context=2 x expert=2": (dict(fsdp=2, context=2, expert=2), "dropless"),
    "context=4 x expert=2, capacity": (dict(context=4, expert=2), "capacity"),
}


def _two_steps(cfg, mesh: dict, dispatch: str = "dropless"):
    from flaxlm import config
    from flaxlm.mesh import make_mesh
    from flaxlm.train import Trainer

    sizes = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, "expert": 1, **mesh}
    moe = dataclasses.replace(cfg.model.moe, dispatch=dispatch)
    cfg = config.replace(cfg, mesh=sizes, model={"moe": moe})
    devices = jax.devices()[: int(np.prod(list(sizes.values())))]
    trainer = Trainer(cfg, make_mesh(cfg, devices))
    state = trainer.init_state(0)
    losses = []
    for seed in range(2):
        state, metrics = trainer.step(state, trainer.global_batch(trainer.synthetic_batch(seed)))
        losses.append([float(metrics[k]) for k in ("loss", "moe_aux_loss", "moe_z_loss")])
    return state, np.array(losses)


@pytest.mark.slow
def test_every_mesh_with_experts_gives_the_same_losses(tiny_cfg):
    cfg = tiny_cfg(
        "model.n_layers=1",
        "model.moe.num_experts=8",
        "model.moe.capacity_factor=0",
        "model.moe.z_loss_weight=1e-3",
        "data.seq_len=32",
        "optimizer.warmup_steps=0",
        family="llama",
    )
    ref_state, ref = _two_steps(cfg, {})
    ref_params = jax.device_get(ref_state.params)
    for name, (mesh, dispatch) in MOE_MESHES.items():
        state, losses = _two_steps(cfg, mesh, dispatch)
        np.testing.assert_allclose(losses, ref, rtol=2e-5, err_msg=name)
        jax.tree.map(
            lambda a, b, n=name: np.testing.assert_allclose(a, b, atol=1e-4, err_msg=n),
            jax.device_get(state.params),
            ref_params,
        )
        up = state.params["block_0"]["mlp"]["up"]
        assert up.addressable_shards[0].data.shape[0] == 8 // mesh["expert"], name


@pytest.mark.parametrize("preset", ["mixtral-tiny", "deepseek-moe-tiny"])
@pytest.mark.parametrize("scan", [False, True])
def test_parameter_counts_total_and_active_match_the_initialised_tree(preset, scan):
    from conftest import CONFIGS

    from flaxlm import config
    from flaxlm.flops import active_param_count, analytic_param_count, flops_per_step
    from flaxlm.model import Transformer

    cfg = config.load_files(
        [CONFIGS / "tiny.yaml", CONFIGS / "models" / f"{preset}.yaml"],
        [f"model.scan_layers={scan}"],
    )
    m = cfg.model
    shapes = jax.eval_shape(
        lambda: Transformer(m).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    total = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
    # A routed expert's weights have a leading experts axis (after `layers` when scanned); a
    # token uses experts_per_token of them.
    routed = sum(
        int(np.prod(leaf.shape))
        for path, leaf in leaves
        if jax.tree_util.keystr(path).split("'")[-2] in ("gate", "up", "down")
        and "shared" not in jax.tree_util.keystr(path)
        and leaf.ndim == 3 + scan
    )
    active = total - routed + routed * m.moe.experts_per_token // m.moe.num_experts
    assert analytic_param_count(m) == total
    assert active_param_count(m) == active < total
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    attention = 12 * m.n_layers * cfg.data.seq_len * m.n_heads * m.dim_per_head
    assert flops_per_step(cfg, n_params=total) == (6 * active + attention) * tokens


def test_cached_decoding_of_a_mixture_equals_recomputing(tiny_cfg):
    import flax.linen as nn
    from test_generate import PROMPTS, sample_by_recomputing

    from flaxlm.generate import generate
    from flaxlm.model import Transformer

    cfg = tiny_cfg(
        "model.moe.num_experts=4", "model.moe.num_shared_experts=1", "model.scan_layers=true",
        family="llama",
    )  # fmt: skip
    model = Transformer(cfg.model)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)
    got = generate(model, params, PROMPTS[:2], 12, pad_id=258)
    for prompt, tokens in zip(PROMPTS[:2], got, strict=True):
        assert tokens == sample_by_recomputing(model, params, prompt, 12)
