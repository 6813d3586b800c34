"""Per-device memory of a training step: an analytic model and what XLA compiled.

The analytic model counts, per device,
- the train state (parameters and optimizer state), exactly, from each array's shard shape;
- the gradients, one more copy of the parameters' shards (float32, as the optimizer sees them);
- the activations the backward pass keeps, from the remat policy: per layer and per local
  token (rows split over the batch axes, positions over the context axis), a number of
  d_model-wide (and d_ff-wide, and attention-score) tensors, plus the logits, plus one layer's
  all-gathered keys and values under context parallelism.
Activation counts are estimates (XLA fuses, aliases and schedules buffers its own way); the
state is exact. `compiled_memory` reads XLA's memory analysis of the same step
(`flaxlm.xla_stats`) so that the two can be printed side by side (benchmarks/memory_model.py,
`flaxlm compile`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from flaxlm import xla_stats
from flaxlm.config import AttentionKernel, Config, Mlp, Remat

GiB = 1024**3


def _shard_bytes(abstract: Any) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Analytic bytes per device of one training step."""

    params: int
    optimizer: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations

    def to_json(self) -> dict[str, float]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {f"{k}_gib": v / GiB for k, v in {**fields, "total": self.total}.items()}


def _activation_widths(cfg: Config) -> tuple[float, float]:
    """(values kept per token per layer, attention-score values kept per token per layer)."""
    m = cfg.model
    d, ff, hd = m.d_model, m.d_ff, m.dim_per_head
    qkv = (m.n_heads + 2 * m.kv_heads) * hd
    mlp_in = 2 if m.mlp == Mlp.swiglu else 1
    # A kernel that materialises the score matrix keeps scores and probabilities (B, H, T, T);
    # the fused ones keep only the output and the log-sum-exp.
    scores = 2 * m.n_heads if m.attention == AttentionKernel.reference else 0
    if m.remat == Remat.full:
        return d, 0  # the block input; everything else is recomputed
    if m.remat == Remat.save_projections:
        return d + qkv + m.n_heads * hd + mlp_in * ff, 0
    if m.remat == Remat.save_dots:
        return d + qkv + m.n_heads * hd + d + mlp_in * ff + d, 0
    # No remat: norms, projections, attention output, MLP pre/post activation, residuals.
    return 4 * d + qkv + m.n_heads * hd + 2 * mlp_in * ff + ff, scores


def estimate(cfg: Config, abstract_state: Any, mesh_shape: dict[str, int]) -> MemoryEstimate:
    """The analytic per-device memory of cfg's train step on a mesh of mesh_shape."""
    params = _shard_bytes(abstract_state.params)
    optimizer = _shard_bytes(abstract_state.opt_state)
    # Gradients take the parameters' shards in float32 (the dtype the optimizer updates in).
    grad_scale = 4 / np.dtype(cfg.model.param_dtype).itemsize
    gradients = int(params * grad_scale)

    def shards(logical: str) -> int:
        return math.prod(mesh_shape.get(a, 1) for a in cfg.mesh.rules.get(logical, []))

    m = cfg.model
    micro_batch = cfg.data.global_batch_size // cfg.optimizer.grad_accum_steps
    # Rows over the batch axes; with context parallelism, each row's positions over the length
    # axes as well.
    local_rows = micro_batch / shards("batch")
    local_tokens = local_rows * cfg.data.seq_len / shards("length")
    act_bytes = np.dtype(m.dtype).itemsize
    width, scores = _activation_widths(cfg)
    # Local queries attend to the whole row's keys.
    per_layer = local_tokens * (width + scores * cfg.data.seq_len) * act_bytes
    # Logits and their gradient in float32, over the vocabulary shards; a chunked loss holds one
    # chunk's at a time.
    logits = 2 * local_tokens * m.vocab_size / shards("vocab") * 4 / m.logit_chunks
    # Context parallelism: the layer being computed holds its whole rows' keys and values
    # (gathered), and in the backward pass their gradients before the reduce-scatter.
    gathered = 0.0
    if shards("length") > 1:
        kv_width = 2 * m.kv_heads * m.dim_per_head / shards("kv_heads")
        gathered = 2 * local_rows * cfg.data.seq_len * kv_width * act_bytes
    activations = int(m.n_layers * per_layer + logits + gathered)
    return MemoryEstimate(params, optimizer, gradients, activations)


def compiled_memory(compiled: Any) -> dict[str, float]:
    """Per-device GiB of a compiled step; `total` is the live buffers plus the generated code."""
    stats = xla_stats.memory_stats(compiled)
    return {
        "arguments_gib": stats["arguments"] / GiB,
        "outputs_gib": stats["outputs"] / GiB,
        "aliased_gib": stats["aliased"] / GiB,
        "temporaries_gib": stats["temporaries"] / GiB,
        "total_gib": (stats["live"] + stats["code"]) / GiB,
    }
