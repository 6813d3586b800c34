"""Parameter counts, FLOPs per token and device peaks, for throughput and MFU.

FLOPs per trained token follow the usual convention (Kaplan et al., PaLM appendix B):
6 N for the matmuls of the forward and backward passes over N parameters, plus 12 L T d for the
attention scores and weighted sums (L layers, context T, d = heads x head_dim).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import ModelConfig

# Dense bf16 peak FLOP/s per device (per chip, or per TensorCore where JAX shows two per chip).
_PEAK_FLOPS = {
    "TPU v4": 275e12 / 2,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def param_count(params) -> int:
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 L T d (forward + backward)."""
    attn_width = cfg.n_heads * cfg.dim_per_head
    return 6.0 * n_params + 12.0 * cfg.n_layers * seq_len * attn_width


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a dense float32 n x n matmul on the default device, measured here and now."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def total_peak_flops(configured_per_device: float | None = None) -> float | None:
    """Peak FLOP/s of all devices of the job, or None when it is unknown.

    On CPU the JAX "devices" (even when forced to several) share the host's cores, so the peak is
    a float32 matmul measured in this process, times the number of processes.
    """
    devices = jax.devices()
    if configured_per_device:
        return configured_per_device * len(devices)
    if devices[0].platform == "cpu":
        return measured_matmul_flops() * jax.process_count()
    kind = devices[0].device_kind
    for name, peak in _PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak * len(devices)
    return None
