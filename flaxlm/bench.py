"""Throughput benchmark of the train step: `flaxlm bench`.

`bench(cfg)` builds the mesh and the train state of a config, compiles the train step ahead of
time for a synthetic batch of the configured shape, runs a few warm-up steps, then times
`steps` steps one by one (each waits for its result) and returns one flat, JSON-able record:

- step time: median, min, max and the 10th-90th percentile range of the timed steps;
- tokens/s of the whole job and per device (tokens per step / median step time);
- model FLOPs from the analytic count (6N + 12 L T d per token, `flaxlm.flops`), the FLOP/s
  achieved at the median step, the peak of the job's devices and their ratio, the MFU. On CPU
  the peak is dense float32 matmuls run in this same process for as long as the timed steps
  took, right after them, so MFU is a ratio measured side by side; on accelerators it is the
  bf16 peak of the device table (or `train.peak_flops_per_device`);
- XLA's own FLOP count of the compiled step (its cost analysis, per device, times the
  devices), for comparison with the analytic count;
- memory per device from the compiled program (its memory analysis, `flaxlm.xla_stats`):
  arguments, outputs, aliased (donated) bytes, temporaries and their total.

The batch is synthetic (`Trainer.synthetic_batch`: random token ids, one document per row) so
that the figure measures the step alone; the input pipeline is measured by `flaxlm train`'s
data-wait time.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from flaxlm import xla_stats
from flaxlm.config import Config, ConfigError
from flaxlm.flops import (
    active_param_count,
    analytic_param_count,
    find_chip,
    flops_per_step,
    flops_per_token,
    sustained_matmul_flops,
)
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer


def peak_flops(
    cfg: Config, devices: list[jax.Device], timed_seconds: float = 1.0
) -> tuple[float | None, str]:
    """Peak FLOP/s of `devices` together, and where the figure comes from.

    The configured value, else the device table, as `flaxlm.flops.total_peak_flops` does, but for
    a subset of the devices (a sweep benchmarks meshes of 1, 2, ... devices in one process). On
    CPU it is float32 matmuls measured for as long as the timed steps took (1 to 10 s) right
    after them, so that both sides of the MFU ratio see the same load on a shared machine.
    """
    configured = cfg.train.peak_flops_per_device
    if configured:
        return configured * len(devices), "train.peak_flops_per_device"
    if devices[0].platform == "cpu":
        # Forced CPU "devices" share the host's cores: their peak together is the host's.
        measured = sustained_matmul_flops(min(max(timed_seconds, 1.0), 10.0))
        return measured * jax.process_count(), "float32 matmul measured in-process"
    kind = devices[0].device_kind
    chip = find_chip(kind)
    if chip is None:
        return None, f"unknown device kind {kind!r}: set train.peak_flops_per_device"
    return chip.per_device()[0] * len(devices), f"bf16 peak of {kind}"


def _memory(compiled) -> dict[str, int | None]:
    stats = xla_stats.memory_stats(compiled)
    if stats is None:  # some backends do not report it
        return {"memory_per_device_bytes": None}
    return {
        "memory_argument_bytes": stats["arguments"],
        "memory_output_bytes": stats["outputs"],
        "memory_alias_bytes": stats["aliased"],
        "memory_temp_bytes": stats["temporaries"],
        "memory_per_device_bytes": stats["live"],
    }


def _time_steps(compiled, state, batch, steps: int, warmup: int) -> tuple[list[float], float]:
    """Seconds of each of `steps` steps after `warmup` untimed ones (each step waits for its
    result), and the loss of the last."""
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times, float(metrics["loss"])


def _step_seconds(times: list[float]) -> dict[str, float]:
    return {
        "step_seconds": float(np.median(times)),
        "step_seconds_min": float(np.min(times)),
        "step_seconds_max": float(np.max(times)),
        "step_seconds_p10": float(np.percentile(times, 10)),
        "step_seconds_p90": float(np.percentile(times, 90)),
    }


def bench(
    cfg: Config,
    steps: int = 10,
    warmup: int = 2,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Compiles, warms up and times the train step of cfg; see the module docstring."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"bench needs --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    devices = list(devices) if devices is not None else jax.devices()
    mesh = make_mesh(cfg, devices)
    trainer = Trainer(cfg, mesh)
    batch = trainer.global_batch(trainer.synthetic_batch(cfg.train.seed))
    state = trainer.init_state(cfg.train.seed)

    start = time.perf_counter()
    compiled = trainer.compile_step()
    compile_seconds = time.perf_counter() - start

    times, loss = _time_steps(compiled, state, batch, steps, warmup)

    n_devices = len(devices)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    n_params = analytic_param_count(cfg.model)
    # FLOPs count the parameters a token uses (a mixture of experts: its active experts).
    per_token = flops_per_token(cfg.model, active_param_count(cfg.model), cfg.data.seq_len)
    model_flops_per_step = flops_per_step(cfg, n_params)
    median = float(np.median(times))
    achieved = model_flops_per_step / median
    peak, peak_source = peak_flops(cfg, devices, float(np.sum(times)))
    xla_per_device = xla_stats.cost_stats(compiled).get("flops")
    xla_per_step = xla_per_device * n_devices if xla_per_device is not None else None
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": n_devices,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "params": n_params,
        "global_batch_size": cfg.data.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "warmup": warmup,
        "compile_seconds": compile_seconds,
        **_step_seconds(times),
        "tokens_per_second": tokens_per_step / median,
        "tokens_per_second_per_device": tokens_per_step / median / n_devices,
        "flops_per_token": per_token,
        "model_flops_per_step": model_flops_per_step,
        "model_flops_per_second": achieved,
        "peak_flops_per_second": peak,
        "peak_source": peak_source,
        "mfu": achieved / peak if peak else None,
        "xla_flops_per_step": xla_per_step,
        "analytic_over_xla_flops": model_flops_per_step / xla_per_step if xla_per_step else None,
        **_memory(compiled),
        "final_loss": loss,
    }
