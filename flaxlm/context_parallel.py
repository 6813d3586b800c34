"""Context parallelism: each sequence split over the `context` mesh axis.

Activations carry the logical axis `length`, which the rules map to the `context` mesh axis, so
every device holds T / C positions of each of its rows (C = the axis size) and the memory of
activations falls by C. Parameters are split over the context axis too (the `embed` rule:
FSDP over fsdp x context), so that a long row spread over C chips does not leave each of them
a whole copy of the model. Attention is the one place where positions meet: each layer all-gathers
the keys and values over the axis (GSPMD inserts the all-gather where attention asks for them
whole, and a reduce-scatter of their gradients), while queries stay split.

Causal attention makes a plain split unfair: the shard holding the last positions attends to
every key, the first one to almost none. So the model reorders each row before its first layer
(`load_balanced_order`): the row is cut into 2C chunks and shard i gets chunks i and 2C-1-i, one
early and one late, the same work for every shard. Masks are then built from each token's
original index (`flaxlm.attention.position_mask`), not its place in the reordered row, and the
model puts the row back in order after its last layer, so its logits, losses and every caller
see the usual order. Reordering the integer inputs is local (rows arrive whole on every context
shard); restoring the order exchanges one d_model-wide activation per token, once per step.

Decoding (one new position at a time) never reorders.
"""

from __future__ import annotations

import numpy as np

from flaxlm.mesh import current_mesh, logical_mesh_axes, shard_count


def context_shards() -> int:
    """Into how many shards the mesh being traced under splits each row: the product of the
    mesh axes that the logical axis `length` maps to (1 outside a mesh or rules context)."""
    mesh = current_mesh()
    return 1 if mesh is None else shard_count(mesh, logical_mesh_axes("length"))


def load_balanced_order(length: int, shards: int | None = None) -> np.ndarray | None:
    """order_T: the original index of each position of a reordered row, or None when the
    row is not reordered (one context shard, or a length the axis does not split evenly in
    2C chunks: `model.init` traces a batch of one row of any length).

    With C shards and chunks of T / 2C positions, shard i holds chunks i and 2C - 1 - i, so
    `x[:, order_T]` lays a row out for the shards and `x[:, inverse(order_T)]` restores it.
    """
    shards = context_shards() if shards is None else shards
    if shards == 1 or length % (2 * shards):
        return None
    chunks_2CxP = np.arange(length).reshape(2 * shards, length // (2 * shards))
    pairs = [
        np.concatenate([chunks_2CxP[i], chunks_2CxP[2 * shards - 1 - i]]) for i in range(shards)
    ]
    return np.concatenate(pairs)


def inverse(order_T: np.ndarray) -> np.ndarray:
    """The permutation that undoes order_T."""
    inverse_T = np.empty_like(order_T)
    inverse_T[order_T] = np.arange(order_T.size)
    return inverse_T
