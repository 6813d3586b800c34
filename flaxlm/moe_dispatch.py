"""Dropless expert dispatch: slots sorted by expert through grouped matmuls
(`jax.lax.ragged_dot`), and the all-to-all exchange of expert parallelism.

With P devices along the expert axes, each holding W = E / P experts, a device sends the rows
of its sorted slots that belong to device j's experts to device j (an all-to-all of P buffers
of Y rows each: a device's Y slots may all go to one device, so nothing is ever dropped), runs
its own experts on what it receives, and an all-to-all sends the results back.

Shape letters as in `flaxlm.moe`, plus: P devices along the expert axes, W experts per
device, R = P x Y received rows.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm.config import Mlp, ModelConfig

Array = jax.Array


def experts_mlp(
    x: Array, w: dict[str, Array], mlp: Mlp, batched: bool = False, sizes_E: Array | None = None
) -> Array:
    """Every expert's MLP on its rows: x_ExCxD (batched, one buffer per expert) or x_YxD rows
    sorted by expert with sizes_E rows each (rows past the groups come out zero)."""
    if batched:
        matmul = lambda a, b: jnp.einsum("ecd,edf->ecf", a, b)  # noqa: E731
    else:
        matmul = lambda a, b: jax.lax.ragged_dot(a, b, sizes_E)  # noqa: E731
    up = matmul(x, w["up"])
    if mlp == Mlp.swiglu:
        hidden = nn.silu(matmul(x, w["gate"])) * up
    else:
        hidden = nn.gelu(up, approximate=True)
    return matmul(hidden, w["down"])


def _group_sizes(ids: Array, groups: int) -> Array:
    return jnp.zeros((groups,), jnp.int32).at[ids].add(1, mode="drop")


def _exchange(x_YxD: Array, sizes_E: Array, w: dict[str, Array], mlp: Mlp, axes) -> Array:
    """Runs the sorted slots x_YxD through experts spread over the mesh axes `axes`."""
    y, d = x_YxD.shape
    e = sizes_E.shape[0]
    per = w["down"].shape[0]  # W: this device's experts
    p = e // per
    sizes_PxW = sizes_E.reshape(p, per)
    counts_P = sizes_PxW.sum(1)
    starts_P = jnp.cumsum(counts_P) - counts_P
    row_Y = jnp.arange(y)
    # Buffer for device j: its rows of the sorted slots, zero-padded to Y.
    valid_PxY = row_Y[None, :] < counts_P[:, None]
    source_PxY = jnp.minimum(starts_P[:, None] + row_Y[None, :], y - 1)
    send_PxYxD = jnp.where(valid_PxY[..., None], x_YxD[source_PxY], 0)
    exchange = lambda a: jax.lax.all_to_all(a, axes, 0, 0, tiled=True)  # noqa: E731
    recv_PxYxD, recv_sizes_PxW = exchange(send_PxYxD), exchange(sizes_PxW)
    # Each received block is sorted by local expert; padding rows get the id W (no group).
    ends_PxW = jnp.cumsum(recv_sizes_PxW, axis=1)
    local_PxY = jax.vmap(lambda ends: jnp.searchsorted(ends, row_Y, side="right"))(ends_PxW)
    local_R = local_PxY.reshape(-1)
    order_R = jnp.argsort(local_R, stable=True)
    rows_RxD = recv_PxYxD.reshape(p * y, d)[order_R]
    out_RxD = experts_mlp(rows_RxD, w, mlp, sizes_E=recv_sizes_PxW.sum(0))
    out_RxD = jnp.zeros_like(out_RxD).at[order_R].set(out_RxD)
    back_PxYxD = exchange(out_RxD.reshape(p, y, d))
    # Row r of the sorted slots went to device dest_r, at offset r - starts[dest_r].
    dest_Y = jnp.searchsorted(jnp.cumsum(counts_P), row_Y, side="right")
    dest_Y = jnp.minimum(dest_Y, p - 1)
    return back_PxYxD[dest_Y, row_Y - starts_P[dest_Y]]


def dropless(
    x_QxD: Array,
    gates_QxX: Array,
    experts_QxX: Array,
    w: dict[str, Array],
    cfg: ModelConfig,
    expert_axes: tuple[str, ...] = (),
) -> Array:
    """y_QxD = sum over each token's chosen experts of gate x expert(x), nothing dropped."""
    q, k = experts_QxX.shape
    expert_Y = experts_QxX.reshape(-1)
    order_Y = jnp.argsort(expert_Y, stable=True)
    x_YxD = x_QxD[order_Y // k]
    sizes_E = _group_sizes(expert_Y, cfg.moe.num_experts)
    if expert_axes:
        out_YxD = _exchange(x_YxD, sizes_E, w, cfg.mlp, expert_axes)
    else:
        out_YxD = experts_mlp(x_YxD, w, cfg.mlp, sizes_E=sizes_E)
    out_YxD = jnp.zeros_like(out_YxD).at[order_Y].set(out_YxD)
    out_QxXxD = out_YxD.reshape(q, k, -1)
    return jnp.einsum("qxd,qx->qd", out_QxXxD, gates_QxX.astype(out_QxXxD.dtype))
