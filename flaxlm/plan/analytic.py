"""A step time from the config alone, to choose which candidates to compile first.

Compiling a large model takes minutes, so the planner orders the candidates that could fit by
this estimate and compiles the best `--compile N` of them; the compiled programs then rank
themselves (`flaxlm.step_time`). Per device and step:

- compute: the model FLOPs (`flaxlm.flops.flops_per_step`) times what the remat policy
  recomputes (the forward pass again under full remat: 8/6; less when projections or matmul
  outputs are kept), at the peak; with an unfused attention kernel, plus its score matrices
  through memory;
- FSDP: per micro-batch, the parameters' shards all-gathered for the forward and the
  backward pass and the float32 gradients reduce-scattered, over the fsdp axis;
- data parallelism: one all-reduce of the float32 gradient shards per step, over data;
- tensor parallelism: per layer and micro-batch, four all-reduces of the local activations
  (two forward, two backward);

each collective at ring cost (`flaxlm.step_time`) on ICI, or on DCN for the axis that
spans slices, combined as the compiled estimate combines them.
"""

from __future__ import annotations

import numpy as np

from flaxlm.config import MESH_AXES, AttentionKernel, Config, Remat
from flaxlm.flops import analytic_param_count, flops_per_step
from flaxlm.plan.candidates import Candidate
from flaxlm.step_time import step_seconds

# FLOPs of the step relative to the model FLOPs (forward 2N + backward 4N per token), by what
# the backward pass recomputes.
RECOMPUTE = {
    Remat.none: 1.0,
    Remat.save_dots: 1.02,  # elementwise ops only
    Remat.save_projections: 1.1,  # the MLP's hidden activation and the attention scores
    Remat.full: 8 / 6,  # the whole forward pass
}


def _ring(n: int, all_reduce: bool = False) -> float:
    return (2.0 if all_reduce else 1.0) * (n - 1) / n


def analytic_seconds(
    candidate: Candidate,
    cfg: Config,
    rates: tuple[float, float, float, float],
    overlap: bool,
) -> dict[str, float]:
    """The step seconds of cfg laid out as candidate, overlapped, serial and the estimate
    (see the module docstring). `rates`: per device, peak FLOP/s and HBM, ICI and DCN bytes
    per second (`flaxlm.plan.compile.Target`)."""
    peak, hbm_bandwidth, ici_bandwidth, dcn_bandwidth = rates
    m, mesh = cfg.model, candidate.mesh()
    devices = int(np.prod(list(mesh.values())))
    params = analytic_param_count(m)
    compute = flops_per_step(cfg, params) * RECOMPUTE[candidate.remat] / devices / peak
    if candidate.attention in (AttentionKernel.xla, AttentionKernel.reference):
        # An unfused kernel writes and reads the scores and the probabilities (float32) in
        # memory, forward and backward; a fused one keeps them on chip.
        rows = candidate.micro_batch(cfg) * candidate.accum
        seq = cfg.data.seq_len
        scores = rows * m.n_heads / mesh["tensor"] * seq / mesh["context"] * seq * 4
        compute += m.n_layers * 6 * scores / hbm_bandwidth
    tensor, fsdp, data = mesh["tensor"], mesh["fsdp"], mesh["data"]
    dcn = dict(zip(MESH_AXES, candidate.dcn, strict=True))
    param_bytes = np.dtype(m.param_dtype).itemsize
    shard = params / tensor  # parameters of one tensor-parallel rank
    ici = dcn_bytes = 0.0

    def add(nbytes: float, axis: str) -> None:
        nonlocal ici, dcn_bytes
        if dcn[axis] > 1:
            dcn_bytes += nbytes
        else:
            ici += nbytes

    if fsdp > 1:
        gathers = 2 * shard * param_bytes * _ring(fsdp)
        scatter = shard * 4 * _ring(fsdp)
        add(candidate.accum * (gathers + scatter), "fsdp")
    if data > 1:
        add(shard / fsdp * 4 * _ring(data, all_reduce=True), "data")
    if tensor > 1:
        tokens = candidate.micro_batch(cfg) * cfg.data.seq_len / mesh["context"]
        per_layer = 4 * tokens * m.d_model * np.dtype(m.dtype).itemsize
        add(candidate.accum * m.n_layers * per_layer * _ring(tensor, True), "tensor")
    comm = {"ici_seconds": ici / ici_bandwidth, "dcn_seconds": dcn_bytes / dcn_bandwidth}
    return step_seconds(compute, comm, overlap)
