"""The planner: enumerate, prune, order, compile, price and rank the layouts of one config on
one target.

    candidates ─> divide? (config checks) ─> could fit? (analytic memory, generous)
      ─> ordered by the analytic step time ─> the first N compiled (cached, in parallel)
      ─> each priced from its program (`flaxlm.step_time`) ─> fitting ones ranked by time

The estimate of a compiled candidate is its program's roofline (every instruction of every
loop iteration at the slower of FLOPs at peak and bytes at HBM bandwidth) with its collectives
at ICI and DCN bandwidth: overlapped on TPUs and GPUs, serial on the CPU, where the rates are
measured (see `flaxlm.plan.compile`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flaxlm import memory, step_time
from flaxlm.config import AttentionKernel, Config, ConfigError, Remat
from flaxlm.flops import devices_per_chip, find_chip
from flaxlm.plan import analytic, candidates
from flaxlm.plan.candidates import Space
from flaxlm.plan.compile import Target, compile_all, target_devices


def make_target(topology: str | None, slices: int = 1, hbm_gib: float | None = None) -> Target:
    """The target of a plan: a TPU topology's chip from the table, or the local devices (on
    the CPU, the host's rates measured now and shared by its forced devices). hbm_gib
    overrides the memory per device (None: the chip's; unknown on the CPU: no limit)."""
    import jax

    from flaxlm import aot
    from flaxlm.flops import measured_matmul_flops, measured_memory_bandwidth

    if topology is not None:
        generation, _ = aot.parse_topology(topology)
        devices = aot.topology_devices(topology, slices)
    else:
        if slices != 1:
            raise ConfigError("--slices needs --topology: the local devices are one slice")
        generation, devices = None, jax.devices()
    chip = find_chip(generation or devices[0].device_kind)
    if chip is None:  # the CPU
        n = len(devices)
        flops, bandwidth = measured_matmul_flops() / n, measured_memory_bandwidth() / n
        rates, overlap, hbm = (flops, bandwidth, bandwidth, bandwidth), False, None
    else:
        rates, overlap = step_time.device_rates(devices), True
        hbm = chip.per_device(devices_per_chip(devices))[1]
        if hbm is None and topology is None:  # a GPU here: its memory as the runtime reports it
            limit = (devices[0].memory_stats() or {}).get("bytes_limit")
            hbm = limit / memory.GiB if limit else None
    kind = devices[0].device_kind
    return Target(topology, slices, len(devices), kind, rates, overlap, hbm_gib or hbm)


def default_space(cfg: Config, target: Target, scan: str = "config") -> Space:
    """The choices worth trying for cfg on target: every remat policy; the fused attention
    kernel of the platform beside XLA's; the expert axis for a mixture of experts; scanned
    layers as configured, or both ways (scan="both")."""
    kind = target.device_kind
    fused = AttentionKernel.splash if kind.startswith("TPU") else None
    fused = AttentionKernel.cudnn if kind.startswith("NVIDIA") else fused
    attentions = (AttentionKernel.xla,) if fused is None else (fused, AttentionKernel.xla)
    axes = ("data", "fsdp", "tensor", *(("expert",) if cfg.model.moe.enabled else ()))
    scans = (True, False) if scan == "both" else (cfg.model.scan_layers,)
    return Space(axes=axes, remats=tuple(Remat), attentions=attentions, scans=scans)


@dataclasses.dataclass
class PlanResult:
    """The ranked rows (compiled candidates, best first) and what was dropped on the way."""

    rows: list[dict[str, Any]]
    enumerated: int
    pruned: int
    not_compiled: int
    target: Target


def price(cfg: Config, compiled: dict[str, Any], target: Target) -> dict[str, Any]:
    """The estimate of one compiled candidate, and whether it fits."""
    mem = compiled["memory"]
    fits = mem is not None and (target.hbm_gib is None or mem["total_gib"] <= target.hbm_gib)
    row: dict[str, Any] = {
        "memory_gib": mem["total_gib"] if mem else None,
        "headroom_gib": (target.hbm_gib - mem["total_gib"]) if mem and target.hbm_gib else None,
        "fits": fits,
        "error": compiled.get("error"),
        "compile_seconds": compiled.get("compile_seconds"),
        "cached": compiled.get("cached", False),
    }
    if compiled["hlo"]:
        found = step_time.step_estimate(
            cfg, compiled["hlo"], target.devices, target.rates, target.slices, target.overlap
        )
        comm = found.pop("collectives")
        row.update(found, **comm, collective_bytes=comm["ici_bytes"] + comm["dcn_bytes"])
    return row


def plan(
    cfg: Config,
    target: Target,
    space: Space,
    compile_limit: int = 8,
    jobs: int = 1,
    cache: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> PlanResult:
    """Plans cfg on target (see the module docstring)."""
    devices = target_devices(target)
    per_slice = target.devices // target.slices
    found = candidates.enumerate_candidates(cfg, per_slice, target.slices, space)
    if not found:
        raise ConfigError(
            f"no layout of {target.devices} devices divides this model and batch "
            f"(data.global_batch_size={cfg.data.global_batch_size}); try another batch size"
        )
    progress(f"{len(found)} candidates divide the model and the batch")
    estimates = candidates.memory_estimates(cfg, found, devices)
    pairs = zip(found, estimates, strict=True)
    survivors = [(c, e) for c, e in pairs if candidates.could_fit(e, target.hbm_gib)]
    progress(f"{len(survivors)} could fit in {target.hbm_gib or 'unlimited'} GiB per device")
    guesses = [
        analytic.analytic_seconds(c, cfg, target.rates, target.overlap) for c, _ in survivors
    ]
    # Those the memory model says fit come first, then those within its margin; each group
    # fastest first by the analytic estimate.
    ordered = sorted(
        ((c, e, g) for (c, e), g in zip(survivors, guesses, strict=True)),
        key=lambda t: (
            not candidates.could_fit(t[1], target.hbm_gib, margin=1.0),
            t[2]["estimated_step_seconds"],
            t[2]["step_seconds_serial"],
        ),
    )
    chosen = ordered[:compile_limit]
    configs = [c.apply(cfg) for c, _, _ in chosen]
    rows: list[dict[str, Any]] = [{} for _ in chosen]

    def done(i: int, compiled: dict[str, Any]) -> None:
        candidate, estimate, guess = chosen[i]
        rows[i] = {
            "label": candidate.label(),
            **candidate.to_json(),
            "micro_batch_per_device": candidate.micro_batch(cfg),
            "analytic_memory_gib": estimate.total / memory.GiB,
            "analytic_step_seconds": guess["estimated_step_seconds"],
            **price(configs[i], compiled, target),
            "overrides": candidate.overrides(),
        }
        progress(f"compiled {sum(bool(r) for r in rows)}/{len(chosen)}: {candidate.label()}")

    compile_all(configs, target, jobs, cache, done)
    rows.sort(key=_rank_key)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    pruned, not_compiled = len(found) - len(survivors), len(ordered) - len(chosen)
    return PlanResult(rows, len(found), pruned, not_compiled, target)


def _rank_key(row: dict[str, Any]) -> tuple:
    """Fitting candidates first, by estimated time, ties by the serial time."""
    seconds = row.get("estimated_step_seconds")
    return (
        not row["fits"],
        seconds if seconds is not None else math.inf,
        row.get("step_seconds_serial") or math.inf,
    )
