"""Ahead-of-time compilation of the train step for TPU topologies that are not here.

With libtpu installed (extra `tpu`), `jax.experimental.topologies` describes the devices of a
TPU slice by name (`v5p:4x4x4`, `v5e:16x16`, ...), on any machine. The train step lowers and
compiles against them exactly as it would on the pod, so XLA's memory analysis says whether a
config and mesh fit in HBM, and its cost analysis gives the FLOPs per step, before a single
chip is reserved.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

import jax

from flaxlm import hlo_cost, memory, step_cost, step_time, xla_stats
from flaxlm.config import AttentionKernel, Config, ConfigError
from flaxlm.flops import (
    TPU_GENERATIONS,
    active_param_count,
    analytic_param_count,
    find_chip,
    flops_per_step,
)
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer

_TOPOLOGY = re.compile(rf"^({'|'.join(TPU_GENERATIONS)}):(\d+)x(\d+)(?:x(\d+))?$")


def parse_topology(name: str) -> tuple[str, int]:
    """(generation, chips) of a topology name such as v5p:4x4x4; a clear error otherwise."""
    match = _TOPOLOGY.match(name)
    if not match:
        raise ConfigError(
            f"--topology {name!r} is not a TPU topology name; use GENERATION:AxB[xC] with "
            f"GENERATION one of {sorted(TPU_GENERATIONS)}, for example v5p:4x4x4, v5e:16x16, "
            "v6e:8x8"
        )
    dims = [int(x) for x in match.groups()[1:] if x is not None]
    return match.group(1), math.prod(dims)


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
    """The devices of num_slices TPU slices of topology `name`, described by libtpu."""
    parse_topology(name)
    if num_slices < 1:
        raise ConfigError(f"--slices {num_slices} must be at least 1")
    # libtpu would otherwise look for the metadata server and workers of a TPU VM that this
    # machine is not (and say so at length); the topology name alone describes the devices.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    # No TPU is opened, so several compiling processes may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(
            "compiling for TPU topologies needs libtpu: pip install -e '.[tpu]' (it works on "
            "machines without TPUs; set JAX_PLATFORMS=cpu there)"
        ) from None
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu raises its own error types
        raise ConfigError(f"libtpu cannot describe topology {name!r}: {e}") from e
    return list(topo.devices)


def compile_or_refusal(trainer: Trainer) -> tuple[Any, str | None]:
    """(the compiled train step, None), or (None, the compiler's message) when it refuses a
    program that cannot fit in HBM (the TPU compiler says by how much)."""
    try:
        return trainer.compile_step(), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).splitlines()[0]


def compile_report(cfg: Config, topology: str, num_slices: int = 1) -> dict[str, Any]:
    """Compiles cfg's train step for the topology; returns memory, fit, FLOPs and step-time
    estimates per device."""
    generation, chips_per_slice = parse_topology(topology)
    devices = topology_devices(topology, num_slices)
    chips = chips_per_slice * num_slices
    chip = find_chip(generation)
    # v4 shows two devices (TensorCores) per chip here: memory and peak are shared by them.
    _, hbm = chip.per_device(len(devices) / chips)
    mesh = make_mesh(cfg, devices)
    trainer = Trainer(cfg, mesh)
    estimate = memory.estimate(cfg, trainer.abstract_state, dict(mesh.shape))
    started = time.perf_counter()
    compiled, error = compile_or_refusal(trainer)
    compiled_mem = memory.compiled_memory(compiled) if error is None else None
    cost = xla_stats.cost_stats(compiled) if error is None else {}
    compile_seconds = time.perf_counter() - started
    step, how, roofline = cost, "the compiled step", chip.roofline(len(devices) / chips)
    hlo = compiled.as_text() if error is None else ""
    program = hlo_cost.program_cost(hlo, *roofline) if error is None else {}
    if error is None and step_cost.has_loops(cfg):
        step, how = step_cost.step_cost(cfg, mesh)
    elif error is None:
        # The compiler's own loops (windowed einsums) counted by their trip counts.
        step = step_cost.with_missed(cost, program)
        how += ", its loops counted by their trip counts"
    n_params = analytic_param_count(cfg.model)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    analytic_flops = flops_per_step(cfg, n_params)
    peak = chip.peak_flops * chips
    return {
        "topology": topology,
        "slices": num_slices,
        "chips": chips,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "remat": str(cfg.model.remat),
        "params": n_params,
        "active_params": active_param_count(cfg.model),
        "tokens_per_step": tokens,
        "memory_per_device": compiled_mem,
        "estimate_per_device": estimate.to_json(),
        "hbm_per_device_gib": hbm,
        "fits": compiled_mem is not None and compiled_mem["total_gib"] <= hbm,
        "error": error,
        # As compiled: a loop body (scanned layers, micro-batches) counted once.
        "xla_flops_per_device": float(cost.get("flops", 0.0)),
        # The whole step, loops counted by their trip counts (flaxlm/step_cost.py).
        "xla_step_flops_per_device": step.get("flops"),
        "xla_step_bytes_per_device": step.get("bytes_accessed"),
        # Loops whose trip count the HLO does not show: their bodies are counted once.
        "xla_step_unknown_loops": step.get("unknown_loops"),
        **_xla_step_estimate(
            step, how, analytic_flops / peak, cfg.model.attention == AttentionKernel.splash
        ),
        **_roofline_estimate(
            program, analytic_flops / peak, cfg.model.attention == AttentionKernel.splash
        ),
        **_estimate(cfg, hlo, program, devices, num_slices),
        "analytic_flops_per_step": analytic_flops,
        # The step time if every chip ran at its bf16 peak: a floor, for planning.
        "step_seconds_at_peak": analytic_flops / peak,
        "compile_seconds": compile_seconds,
    }


def _xla_step_estimate(
    step: dict[str, float], how: str, seconds_at_peak: float, custom_kernel: bool = False
) -> dict:
    """XLA's own step-time estimate (and the MFU it implies) where it means something, else
    None and the reason: on v5e and v6e libtpu gives a negative time, which is no estimate.

    With a custom kernel (splash attention: a Mosaic custom call) XLA costs the step without
    it: its FLOPs, bytes and time leave attention out, so the time is a floor and no MFU is
    implied (at long context attention is a large share of the step).
    """
    seconds = step.get("optimal_seconds")
    if seconds is None or seconds <= 0:
        why = "XLA gives no step-time estimate for this TPU generation"
        return {"xla_step_seconds": None, "xla_mfu": None, "xla_estimate": f"unavailable: {why}"}
    if custom_kernel:
        how += "; a floor: XLA does not cost the splash attention kernel (a custom call)"
        return {"xla_step_seconds": seconds, "xla_mfu": None, "xla_estimate": how}
    return {"xla_step_seconds": seconds, "xla_mfu": seconds_at_peak / seconds, "xla_estimate": how}


def _roofline_estimate(program: dict, seconds_at_peak: float, custom_kernel: bool) -> dict:
    """The step time of the compiled program at the chip's roofline (`flaxlm.hlo_cost`:
    every instruction of every loop iteration at the slower of its matmul FLOPs at peak and
    its HBM bytes at full bandwidth; no overlap, no collectives), on every TPU generation,
    and the MFU it implies. With a custom kernel (splash attention) the kernel is priced by
    its bytes alone: the time is a floor and no MFU is implied."""
    seconds = program.get("seconds")
    if not seconds:
        return {"roofline_step_seconds": None, "roofline_mfu": None}
    mfu = None if custom_kernel else seconds_at_peak / seconds
    return {"roofline_step_seconds": seconds, "roofline_mfu": mfu}


def _estimate(
    cfg: Config, hlo: str, program: dict, devices: list[Any], num_slices: int
) -> dict[str, Any]:
    """The step time of the compiled program (`program`: its roofline, priced at the same
    rates) with its collectives (`flaxlm.step_time`)."""
    if not hlo:
        return {"collectives": None, "estimated_step_seconds": None, "estimated_mfu": None}
    rates = step_time.device_rates(devices)
    found = step_time.step_estimate(cfg, hlo, len(devices), rates, num_slices, program=program)
    keys = ("collectives", "step_seconds_overlapped", "step_seconds_serial")
    return {
        **{k: found[k] for k in keys},
        "estimated_step_seconds": found["estimated_step_seconds"],
        "estimated_mfu": found["estimated_mfu"],
    }
