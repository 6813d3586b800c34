"""Parameter counts, FLOPs per token and per step, and the table of accelerator chips.

FLOPs per trained token follow the usual convention (Kaplan et al., PaLM appendix B):
6 N for the matmuls of the forward and backward passes over N parameters, plus 12 L T d for the
attention scores and weighted sums (L layers, context T, d = heads x head_dim). For a mixture of
experts N counts the active parameters: the routed experts a token goes through, not all.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import (
    Arch,
    Config,
    Mlp,
    ModelConfig,
    Norm,
    Position,
    expert_width,
    is_sparse_layer,
)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: its dense bf16 peak, its HBM, its HBM bandwidth and its
    interconnect bandwidths, per chip."""

    # As TPU topology names spell it (v5p:4x4x4), or the GPU's model.
    generation: str
    # Prefixes of jax.Device.device_kind that name this chip, most specific first.
    device_kinds: tuple[str, ...]
    peak_flops: float
    hbm_gib: float | None
    hbm_bandwidth: float  # bytes per second
    # Bytes per second one chip moves in a ring collective over one axis of its fast
    # interconnect (TPU ICI: both directions of one torus axis; GPU NVLink: per direction).
    ici_bandwidth: float
    # Bytes per second out of one chip across the data-center network between slices (TPU
    # DCN: the host's NICs shared by its chips; GPU: one InfiniBand NIC per GPU).
    dcn_bandwidth: float

    def per_device(self, devices_per_chip: float = 1.0) -> tuple[float, float | None]:
        """(peak FLOP/s, HBM GiB) of one JAX device when each chip shows as devices_per_chip
        devices, which share the chip's compute and memory.

        JAX shows one device per chip on v5e, v5p and v6e, and on v4 at run time (megacore: the
        two TensorCores act as one); libtpu's topology descriptions show v4 as two devices per
        chip, one per TensorCore.
        """
        hbm = self.hbm_gib / devices_per_chip if self.hbm_gib is not None else None
        return self.peak_flops / devices_per_chip, hbm

    def roofline(self, devices_per_chip: float = 1.0) -> tuple[float, float]:
        """(peak FLOP/s, HBM bytes/s) of one JAX device (see `per_device`)."""
        return self.peak_flops / devices_per_chip, self.hbm_bandwidth / devices_per_chip


# Dense bf16 peak and HBM bandwidth per chip from the published TPU and GPU specs (SXM parts).
# GPU memory differs between variants of one model (A100 40 or 80 GB), so only TPU chips carry
# their HBM. Interconnect: ICI per torus axis (both directions of a link) and DCN per chip as
# the JAX scaling book's "TPU Specs" give them (jax-ml.github.io/scaling-book/tpus), which agree
# with the Cloud TPU pages (v5p: 50 Gbps of DCN per chip); NVLink per direction and one
# 400 Gb/s InfiniBand NIC per GPU (200 Gb/s on A100) from its GPU chapter.
CHIPS: tuple[Chip, ...] = (
    Chip("v4", ("TPU v4",), 275e12, 32, 1228e9, 9e10, 6.25e9),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16, 819e9, 9e10, 3.125e9),
    Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, 95, 2765e9, 1.8e11, 6.25e9),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32, 1640e9, 1.8e11, 12.5e9),
    Chip("H100", ("NVIDIA H100",), 989e12, None, 3.35e12, 450e9, 50e9),
    Chip("H200", ("NVIDIA H200",), 989e12, None, 4.8e12, 450e9, 50e9),
    Chip("A100", ("NVIDIA A100",), 312e12, None, 2.039e12, 300e9, 25e9),
    Chip("B200", ("NVIDIA B200",), 2250e12, None, 8e12, 900e9, 50e9),
)
TPU_GENERATIONS = tuple(c.generation for c in CHIPS if c.device_kinds[0].startswith("TPU"))


def devices_per_chip(devices: list) -> float:
    """How many JAX devices each chip shows as: libtpu's topology descriptions show a v4 chip
    as two devices (one per TensorCore), which share its compute, memory and links; devices
    without chip coordinates (CPU, GPU) count one each. A chip is its coordinates within its
    slice: each slice of a multislice job has chips at the same coordinates."""
    coords = [getattr(d, "coords", None) for d in devices]
    if any(c is None for c in coords):
        return 1.0
    slices = [getattr(d, "slice_index", 0) or 0 for d in devices]
    chips = {(s, tuple(c)) for s, c in zip(slices, coords, strict=True)}
    return len(devices) / len(chips)


def find_chip(name: str) -> Chip | None:
    """The chip of a TPU generation (`v5p`) or of a JAX device kind (`TPU v5 lite`, `NVIDIA
    H100 80GB HBM3`), or None if the table does not know it."""
    for chip in CHIPS:
        if name == chip.generation:
            return chip
    # A kind such as "TPU v5 lite" also starts with the v5p's "TPU v5": the table lists the
    # more specific kinds first.
    for chip in CHIPS:
        if any(name.startswith(kind) for kind in chip.device_kinds):
            return chip
    return None


def param_count(params) -> int:
    """Parameters in a tree of arrays (or of ShapeDtypeStructs, from jax.eval_shape)."""
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))


def _mlp_params(cfg: ModelConfig, width: int, bias: bool) -> int:
    mlp_in = 2 if cfg.mlp in (Mlp.swiglu, Mlp.geglu) else 1
    return (mlp_in + 1) * cfg.d_model * width + ((mlp_in * width + cfg.d_model) if bias else 0)


def _sparse_mlp_params(cfg: ModelConfig, experts: int) -> int:
    """A mixture-of-experts block with `experts` of its routed experts (all of them for the
    total, the experts_per_token a token uses for the active count): router, routed experts
    (no biases) and shared experts."""
    moe = cfg.moe
    width = expert_width(moe, cfg.d_ff)
    total = cfg.d_model * moe.num_experts + experts * _mlp_params(cfg, width, bias=False)
    if moe.num_shared_experts:
        total += _mlp_params(cfg, moe.num_shared_experts * width, cfg.use_bias)
    return total


def analytic_param_count(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters of the model described by cfg, counted from the architecture alone; with
    `active`, only those one token uses (a mixture of experts counts the experts_per_token
    routed experts a token goes through, not all of them)."""
    d, heads, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    bias = cfg.use_bias
    norm = 2 * d if cfg.norm == Norm.layernorm else d
    attention = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    attention += (heads * hd + 2 * kv * hd + d) if bias else 0
    attention += (heads * hd + 2 * kv * hd) if cfg.qkv_bias and not bias else 0
    attention += 2 * hd if cfg.qk_norm else 0
    norms = (4 if cfg.post_norms else 2) * norm
    dense_mlp = _mlp_params(cfg, cfg.d_ff, bias)
    routed = cfg.moe.experts_per_token if active else cfg.moe.num_experts
    total = cfg.vocab_size * d + norm
    for layer in range(cfg.n_layers):
        sparse = is_sparse_layer(cfg.moe, layer)
        total += attention + norms + (_sparse_mlp_params(cfg, routed) if sparse else dense_mlp)
    if cfg.position == Position.learned:
        total += cfg.max_seq_len * d
    if not cfg.tie_embeddings:
        total += d * cfg.vocab_size
    if cfg.arch == Arch.encoder:
        # Token types, a second norm (the embeddings' and the head's instead of a final one)
        # and the masked-LM head's dense layer and output bias.
        total += cfg.type_vocab_size * d + norm + d * d + d + cfg.vocab_size
    return total


def active_param_count(cfg: ModelConfig) -> int:
    """Parameters one token goes through: all of a dense model's, fewer for a mixture of
    experts. Training FLOPs and MFU count these."""
    return analytic_param_count(cfg, active=True)


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 L T d (forward + backward), N the active parameters."""
    attn_width = cfg.n_heads * cfg.dim_per_head
    return 6.0 * n_params + 12.0 * cfg.n_layers * seq_len * attn_width


def flops_per_step(cfg: Config, n_params: int | None = None) -> float:
    """Training FLOPs of one optimizer step of cfg (all micro-batches): the one definition that
    throughput, MFU, scaling-law compute and ahead-of-time reports share. Without n_params the
    parameters are counted from the architecture. A mixture of experts always counts its active
    parameters (the experts a token uses), whatever n_params says."""
    if n_params is None or cfg.model.moe.enabled:
        n_params = active_param_count(cfg.model)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    return flops_per_token(cfg.model, n_params, cfg.data.seq_len) * tokens


def square_matmul(n: int = 1024) -> tuple[jax.Array, Callable[[jax.Array, jax.Array], jax.Array]]:
    """A float32 n x n operand on the default device and a jitted, already compiled matmul."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    return a, matmul


def best_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` dense float32 n x n matmuls, measured now."""
    a, matmul = square_matmul(n)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """`best_matmul_flops`, measured once per process (the training loop's CPU peak)."""
    return best_matmul_flops(n, repeats)


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
    chip = find_chip(devices[0].device_kind)
    return chip.per_device()[0] * len(devices) if chip is not None else None


def sustained_matmul_flops(seconds: float, n: int = 1024) -> float:
    """FLOP/s of back-to-back dense float32 n x n matmuls over about `seconds`, on the default
    device.

    The rate a long computation can sustain here and now. On a shared or throttled host a
    best-of-few measurement (`measured_matmul_flops`) catches short bursts of idle cores, which
    a train step lasting seconds never sees; measured over as long as the steps it is compared
    with, the peak sees the same load they did.
    """
    a, matmul = square_matmul(n)
    count, start = 0, time.perf_counter()
    while True:
        matmul(a, a).block_until_ready()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * count / elapsed


def measured_memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of the fastest of `repeats` elementwise passes over a float32 array of
    `mib` MiB on the default device (each reads it once and writes it once), measured now: the
    memory side of a CPU roofline."""
    x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
    add_one = jax.jit(lambda a: a + 1.0)
    add_one(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        add_one(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * x.nbytes / best
