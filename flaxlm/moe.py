"""The mixture-of-experts feed-forward block: a float32 router, top-k gates, and two ways to
bring tokens to their experts.

- dropless (`model.moe.dispatch=dropless`): the (token, choice) slots are sorted by expert and
  every expert's rows go through a grouped matmul (`jax.lax.ragged_dot`); nothing is dropped.
  Under a mesh it runs per device in `shard_map`: each device routes its own tokens, and with an
  `expert` mesh axis > 1 an all-to-all sends every slot to the device that holds its expert and
  brings the result back (`flaxlm.moe_dispatch`).
- capacity: one-hot dispatch/combine tensors and einsums into per-expert buffers of fixed
  capacity (GShard, Switch); slots beyond an expert's capacity are dropped (first choices are
  served first). The simple reference, partitioned by XLA like any einsum.

The router statistics (load-balancing loss, router z-loss, expert load, dropped fraction) are
sown into the `moe` collection, one value per sparse layer; `router_losses` turns them into the
terms `flaxlm.train` adds to the objective and the metrics it logs.

Shape letters as in `flaxlm.model`, plus: Q tokens (B x T), E experts, X experts per token,
Y = Q x X routed slots, C capacity per expert.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flaxlm.config import Mlp, ModelConfig, MoeConfig, MoeDispatch, Router, expert_width
from flaxlm.layers import FeedForward, dtype_of, normal_init
from flaxlm.mesh import current_mesh, logical_mesh_axes, shard_count
from flaxlm.moe_dispatch import dropless, experts_mlp

Array = jax.Array
MOE_COLLECTION = "moe"
STATS = ("aux_loss", "z_loss", "load_max", "load_min", "dropped")


def route(logits_QxE: Array, moe: MoeConfig) -> tuple[Array, Array]:
    """(gates_QxX float32, experts_QxX int32) from float32 router logits."""
    if moe.router == Router.topk_softmax:
        top_QxX, experts_QxX = jax.lax.top_k(logits_QxE, moe.experts_per_token)
        return jax.nn.softmax(top_QxX, axis=-1), experts_QxX
    probs_QxE = jax.nn.softmax(logits_QxE, axis=-1)
    gates_QxX, experts_QxX = jax.lax.top_k(probs_QxE, moe.experts_per_token)
    if moe.normalize_gates:
        gates_QxX = gates_QxX / gates_QxX.sum(-1, keepdims=True)
    return gates_QxX, experts_QxX


def _psum(x: Array, axes: tuple[str, ...]) -> Array:
    return jax.lax.psum(x, axes) if axes else x


def router_stats(
    logits_QxE: Array, experts_QxX: Array, kept: Array, token_axes: tuple[str, ...] = ()
) -> dict[str, Array]:
    """Load-balancing loss, z-loss, load and dropped fraction over all tokens of the batch
    (summed over `token_axes` when each device holds a part of it). `kept` counts the slots
    that reached their expert."""
    q, e = logits_QxE.shape
    slots = _psum(jnp.float32(experts_QxX.size), token_axes)
    tokens = _psum(jnp.float32(q), token_axes)
    count_E = jnp.zeros((e,), jnp.float32).at[experts_QxX.reshape(-1)].add(1.0)
    load_E = _psum(count_E, token_axes) / slots  # f_e: share of the slots, sums to 1
    prob_E = _psum(jax.nn.softmax(logits_QxE, axis=-1).sum(0), token_axes) / tokens  # P_e
    log_z_Q = jax.nn.logsumexp(logits_QxE, axis=-1)
    return {
        # Switch Transformer: E * sum_e f_e P_e, 1.0 when both are uniform. f_e carries no
        # gradient (counts); P_e does, and pushes probability off overloaded experts.
        "aux_loss": e * jnp.sum(jax.lax.stop_gradient(load_E) * prob_E),
        "z_loss": _psum(jnp.sum(log_z_Q**2), token_axes) / tokens,
        "load_max": e * load_E.max(),
        "load_min": e * load_E.min(),
        "dropped": (slots - _psum(kept.astype(jnp.float32), token_axes)) / slots,
    }


def capacity_dispatch(
    x_QxD: Array, gates_QxX: Array, experts_QxX: Array, w: dict[str, Array], cfg: ModelConfig
) -> tuple[Array, Array]:
    """The einsum reference: (y_QxD, number of kept slots). Slots are served choice-major
    (every token's first choice before any second choice), in token order within a choice."""
    q, x = experts_QxX.shape
    e = cfg.moe.num_experts
    factor = cfg.moe.capacity_factor
    c = q if factor <= 0 else min(q, math.ceil(factor * q * x / e))
    onehot_XxQxE = jax.nn.one_hot(experts_QxX.T, e, dtype=jnp.int32)
    # Position of each slot in its expert's buffer: slots of that expert before it.
    before_XxQxE = jnp.cumsum(onehot_XxQxE.reshape(x * q, e), axis=0).reshape(x, q, e) - 1
    pos_XxQ = jnp.sum(before_XxQxE * onehot_XxQxE, axis=-1)
    keep_XxQ = pos_XxQ < c
    # one_hot of a position >= c is all zeros: a dropped slot dispatches nowhere.
    slot_XxQxExC = onehot_XxQxE[..., None] * jax.nn.one_hot(pos_XxQ, c, dtype=jnp.int32)[:, :, None]
    dispatch_QxExC = slot_XxQxExC.sum(0).astype(x_QxD.dtype)
    combine_QxExC = jnp.einsum("xqec,qx->qec", slot_XxQxExC.astype(jnp.float32), gates_QxX)
    x_ExCxD = jnp.einsum("qec,qd->ecd", dispatch_QxExC, x_QxD)
    out_ExCxD = experts_mlp(x_ExCxD, w, cfg.mlp, batched=True)
    y_QxD = jnp.einsum("qec,ecd->qd", combine_QxExC.astype(out_ExCxD.dtype), out_ExCxD)
    return y_QxD, keep_XxQ.sum()


def routed_experts(
    x_QxD: Array,
    router_DxE: Array,
    w: dict[str, Array],
    cfg: ModelConfig,
    token_axes: tuple[str, ...] = (),
    expert_axes: tuple[str, ...] = (),
) -> tuple[Array, dict[str, Array]]:
    """Routes x_QxD's tokens and runs their experts: (y_QxD, router statistics). Pure; runs
    per device under shard_map when token_axes / expert_axes name mesh axes."""
    logits_QxE = x_QxD.astype(jnp.float32) @ router_DxE.astype(jnp.float32)
    gates_QxX, experts_QxX = route(logits_QxE, cfg.moe)
    if cfg.moe.dispatch == MoeDispatch.capacity:
        y_QxD, kept = capacity_dispatch(x_QxD, gates_QxX, experts_QxX, w, cfg)
    else:
        y_QxD = dropless(x_QxD, gates_QxX, experts_QxX, w, cfg, expert_axes)
        kept = jnp.int32(experts_QxX.size)
    return y_QxD, router_stats(logits_QxE, experts_QxX, kept, token_axes)


def _sharded_routed_experts(
    x_QxD: Array, router_DxE: Array, w: dict[str, Array], cfg: ModelConfig, mesh
) -> tuple[Array, dict[str, Array]]:
    """`routed_experts` per device: tokens split over the batch axes, experts over the expert
    axes; weights are gathered over any other axis (fsdp, tensor) on the way in."""
    # Tokens are rows x positions: split over the batch axes and, with context parallelism,
    # the length axes too (rows are the outer dimension of the flattened tokens).
    token_axes = logical_mesh_axes("batch") + logical_mesh_axes("length")
    token_axes = tuple(a for a in token_axes if mesh.shape[a] > 1)
    expert_axes = tuple(a for a in logical_mesh_axes("expert") if mesh.shape[a] > 1)
    tokens_spec = PartitionSpec(token_axes or None, None)
    expert_spec = PartitionSpec(expert_axes or None, None, None)

    def local(x_QxD, router_DxE, w):
        return routed_experts(x_QxD, router_DxE, w, cfg, token_axes, expert_axes)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens_spec, PartitionSpec(), jax.tree.map(lambda _: expert_spec, w)),
        out_specs=(tokens_spec, PartitionSpec()),
    )(x_QxD, router_DxE, w)


def _per_device(mesh, moe: MoeConfig, rows: int, length: int) -> bool:
    """Whether dropless dispatch runs per device: under a mesh whose batch axes divide the rows
    and whose length axes the positions (a decode step of a few prompts on many devices falls
    back to XLA's partitioning)."""
    if mesh is None or moe.dispatch != MoeDispatch.dropless:
        return False
    batch_shards = shard_count(mesh, logical_mesh_axes("batch"))
    return rows % batch_shards == 0 and length % shard_count(mesh, logical_mesh_axes("length")) == 0


class MoeFeedForward(nn.Module):
    """Routed experts (plus optional shared experts) in place of the dense MLP of a block."""

    cfg: ModelConfig

    def _expert_weights(self) -> dict[str, Array]:
        cfg, moe = self.cfg, self.cfg.moe
        d, e, f = cfg.d_model, moe.num_experts, expert_width(moe, cfg.d_ff)
        param_dtype = dtype_of(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

        def weight(name: str, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> Array:
            init = nn.with_logical_partitioning(normal_init(std), axes)
            return self.param(name, init, shape, param_dtype)

        w = {"up": weight("up", (e, d, f), ("expert", "embed", "mlp"), cfg.init_std)}
        if cfg.mlp == Mlp.swiglu:
            w["gate"] = weight("gate", (e, d, f), ("expert", "embed", "mlp"), cfg.init_std)
        w["down"] = weight("down", (e, f, d), ("expert", "mlp", "embed"), out_std)
        return w

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        cfg, moe = self.cfg, self.cfg.moe
        dtype = dtype_of(cfg.dtype)
        b, t, d = x_BxTxD.shape
        router_DxE = self.param(
            "router",
            nn.with_logical_partitioning(normal_init(cfg.init_std), ("embed", None)),
            (d, moe.num_experts),
            dtype_of(cfg.param_dtype),
        )
        w = {k: v.astype(dtype) for k, v in self._expert_weights().items()}
        x_QxD = x_BxTxD.reshape(b * t, d)
        mesh = current_mesh()
        if _per_device(mesh, moe, b, t):
            y_QxD, stats = _sharded_routed_experts(x_QxD, router_DxE, w, cfg, mesh)
        else:
            y_QxD, stats = routed_experts(x_QxD, router_DxE, w, cfg)
        for name in STATS:
            self.sow(MOE_COLLECTION, name, stats[name])
        y_BxTxD = y_QxD.reshape(b, t, d).astype(dtype)
        if moe.num_shared_experts:
            width = moe.num_shared_experts * expert_width(moe, cfg.d_ff)
            shared_cfg = dataclasses.replace(cfg, d_ff=width)
            y_BxTxD = y_BxTxD + FeedForward(shared_cfg, name="shared")(x_BxTxD)
        return y_BxTxD


def _named(path, name: str) -> bool:
    return any(getattr(k, "key", None) == name for k in path)


def router_losses(stats: dict, moe: MoeConfig, tokens: Array) -> tuple[Array, dict[str, Array]]:
    """From the sown `moe` collection: the weighted router losses to add to a summed objective,
    and the statistics (each averaged over the sparse layers) as sums over `tokens`, so that
    micro-batches add up like the token losses do."""
    flat = jax.tree_util.tree_flatten_with_path(stats)[0]
    means = {}
    for name in STATS:
        values = [leaf.reshape(-1) for path, leaf in flat if _named(path, name)]
        means[name] = jnp.concatenate(values).mean()
    extra = moe.aux_loss_weight * means["aux_loss"] + moe.z_loss_weight * means["z_loss"]
    return extra * tokens, {f"moe_{k}": v * tokens for k, v in means.items()}
