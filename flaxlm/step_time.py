"""The estimated step time of a compiled program: its compute roofline and its collectives.

Each collective of the compiled program (`flaxlm.xla_stats.collectives`, every loop iteration
counted) moves, per device, the bytes its ring algorithm puts on the wire. With R the bytes it
delivers to each device and n the devices of its group:

    all-gather  R (n-1)/n      reduce-scatter  R (n-1)      all-reduce  2 R (n-1)/n
    all-to-all  R (n-1)/n      collective-permute  R

Between TPU slices libtpu hands each transfer to its DCN (megascale) runtime as a send of B
bytes per device over s slices: an all-reduce moves 2 B (s-1)/s, an all-gather B (s-1), a
one-to-one B. Collectives inside a slice run at the chip's ICI bandwidth for one torus axis
(`flaxlm.flops.CHIPS`: a ring over one axis; a group spanning two axes could go faster), those
between slices at its DCN bandwidth per chip.

The step time combines them with the compute roofline of the same program
(`flaxlm.hlo_cost.program_cost`: every instruction at the slower of its FLOPs at peak and its
bytes at HBM bandwidth):

    overlapped = max(compute, ICI, DCN)     serial = compute + ICI + DCN

TPUs and GPUs run collectives asynchronously beside the compute (XLA schedules FSDP
all-gathers ahead of the layer that needs them), so the estimate there is the overlapped time,
a roofline over three resources; the serial time, an upper bound, breaks its ties. XLA:CPU
runs a collective as a synchronous copy in memory: on CPU the estimate is the serial time,
collectives priced at the memory bandwidth.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flaxlm import hlo_cost, xla_stats
from flaxlm.config import AttentionKernel, Config
from flaxlm.flops import devices_per_chip, find_chip, flops_per_step
from flaxlm.xla_stats import Collective

# Bytes on the wire per byte delivered, as a function of the group size n.
_RING = {
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
    "dcn-all-reduce": lambda s: 2 * (s - 1) / s,
    "dcn-all-gather": lambda s: s - 1,
    "dcn-reduce-scatter": lambda s: (s - 1) / s,
    "dcn-all-to-all": lambda s: (s - 1) / s,
}


def wire_bytes(c: Collective) -> float:
    """Bytes one device puts on the wire for one run of collective c (an unknown group: as
    if it spanned two devices; a kind not in the table: the bytes it delivers)."""
    factor = _RING.get(c.kind, lambda n: 1.0)
    return c.nbytes * factor(max(c.group, 2))


def device_rates(devices: list[Any]) -> tuple[float, float, float, float] | None:
    """Per device of these: peak FLOP/s and HBM, ICI and DCN bytes per second, None for a chip
    the table does not know (the CPU). Devices that share a chip (libtpu shows a v4 chip as
    two) share its rates."""
    chip = find_chip(devices[0].device_kind)
    if chip is None:
        return None
    per_chip = devices_per_chip(devices)
    peak, hbm = chip.roofline(per_chip)
    return peak, hbm, chip.ici_bandwidth / per_chip, chip.dcn_bandwidth / per_chip


def collective_seconds(
    collectives: Iterable[Collective], ici_bandwidth: float, dcn_bandwidth: float
) -> dict[str, float]:
    """Wire bytes per step and device inside slices (`ici_bytes`) and between them
    (`dcn_bytes`), and the seconds each takes at its bandwidth."""
    ici = dcn = 0.0
    for c in collectives:
        moved = wire_bytes(c) * c.times
        if c.kind.startswith("dcn-"):
            dcn += moved
        else:
            ici += moved
    return {
        "ici_bytes": ici,
        "dcn_bytes": dcn,
        "ici_seconds": ici / ici_bandwidth,
        "dcn_seconds": dcn / dcn_bandwidth,
    }


def step_seconds(compute: float, comm: dict[str, float], overlap: bool) -> dict[str, float]:
    """The step time of `compute` seconds of roofline and the collectives' `comm`
    (`collective_seconds`): overlapped and serial, and the estimate (see the module
    docstring)."""
    parts = (compute, comm["ici_seconds"], comm["dcn_seconds"])
    overlapped, serial = max(parts), sum(parts)
    return {
        "step_seconds_overlapped": overlapped,
        "step_seconds_serial": serial,
        "estimated_step_seconds": overlapped if overlap else serial,
    }


def kernel_seconds(cfg: Config, devices: int, peak: float) -> float:
    """Seconds of the splash attention kernel per device, which the roofline prices by its
    bytes alone (a custom call): the attention FLOPs of the MFU convention (12 L T d per
    token, `flaxlm.flops`) at the peak. Zero for the kernels XLA compiles itself."""
    if cfg.model.attention != AttentionKernel.splash:
        return 0.0
    m, seq = cfg.model, cfg.data.seq_len
    tokens = cfg.data.global_batch_size * seq
    return 12.0 * m.n_layers * seq * m.n_heads * m.dim_per_head * tokens / devices / peak


def step_estimate(
    cfg: Config,
    hlo: str,
    devices: int,
    rates: tuple[float, float, float, float],
    slices: int = 1,
    overlap: bool = True,
    program: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The estimated step time of cfg's compiled step (its HLO text, on `devices` devices
    over `slices` slices), and the MFU it implies. `rates`: per device, peak FLOP/s and HBM,
    ICI and DCN bytes per second (`device_rates`). `program`: the HLO's
    `flaxlm.hlo_cost.program_cost` at those rates, where the caller has it already."""
    peak, hbm, ici, dcn = rates
    program = program or hlo_cost.program_cost(hlo, peak, hbm)
    comm = collective_seconds(xla_stats.collectives(hlo, slices), ici, dcn)
    compute = program["seconds"] + kernel_seconds(cfg, devices, peak)
    times = step_seconds(compute, comm, overlap)
    mfu = flops_per_step(cfg) / devices / peak / times["estimated_step_seconds"]
    return {
        "roofline_seconds": program["seconds"],
        "compute_seconds": compute,
        "collectives": comm,
        **times,
        "estimated_mfu": mfu,
        "unknown_loops": program["unknown_loops"],
    }
