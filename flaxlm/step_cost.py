"""XLA's cost of a whole train step, with loops counted by their trip counts.

XLA's cost analysis counts the body of a loop once: a step with scanned layers (`nn.scan`) or
gradient accumulation (`lax.scan` over micro-batches) reports the FLOPs, bytes and (on TPU)
estimated seconds of about one layer of one micro-batch. Reading the loop bodies out of the
HLO would need per-computation costs that XLA does not expose, so the step is rebuilt instead
from programs without loops: the same config unrolled and without accumulation, compiled at
two depths a layer period apart, n1 = d + p and n2 = d + 2p layers (d dense first layers of a
mixture of experts, p the period of the layer pattern: `moe.every`, `global_every`), and, with
A micro-batches of b rows, at b and 2b rows. The cost is linear in the depth and in the rows:

    f(n, k) = cost of n layers on k micro-batches' rows in one pass
    step    = f(L, 1) + (A - 1) * (f(L, 2) - f(L, 1))       (the update runs once per step)
    f(L, k) = f(n1, k) + (L - n1) / p * (f(n2, k) - f(n1, k))

A model of at most n2 layers is compiled at its own depth. Without accumulation that is one or
two compiles, with it two or four, all of a few layers. A loss computed in chunks of positions
(`model.logit_chunks`, a third loop) is traced with its chunks unrolled in these programs.

The programs still loop where the compiler made loops: on TPU, a matmul with a sharded operand
becomes a windowed einsum, a loop over the shards. `program_cost` adds the iterations XLA did
not count, read from the HLO (`flaxlm.hlo_cost`): their matmul FLOPs, their bytes and, on a
chip that `flaxlm.flops.CHIPS` knows, their seconds at its roofline, to XLA's own figures.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flaxlm import hlo_cost, xla_stats
from flaxlm.config import Config
from flaxlm.flops import devices_per_chip, find_chip
from flaxlm.output_head import unrolled_chunks
from flaxlm.train import Trainer


def has_loops(cfg: Config) -> bool:
    """Whether the compiled step loops (and XLA's own cost covers one iteration)."""
    m = cfg.model
    return m.scan_layers or m.logit_chunks > 1 or cfg.optimizer.grad_accum_steps > 1


def layer_pattern(cfg: Config) -> tuple[int, int]:
    """(d, p): the dense first layers, then the period after which the layers repeat."""
    m = cfg.model
    first, period = 0, 1
    if m.moe.enabled:
        first, period = m.moe.first_dense_layers, m.moe.every
    if m.sliding_window and m.global_every:
        period = math.lcm(period, m.global_every)
    return first, period


def _unrolled(cfg: Config, n_layers: int, rows: int) -> Config:
    """cfg with n_layers unrolled layers and one pass over `rows` rows: no loops."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, n_layers=n_layers, scan_layers=False),
        optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=1),
        data=dataclasses.replace(cfg.data, global_batch_size=rows),
    )


def _line(a: dict[str, float], b: dict[str, float], t: float) -> dict[str, float]:
    """a + t (b - a), key by key: t = 0 gives a, t = 1 gives b."""
    return {k: a[k] + t * (b[k] - a[k]) for k in a if k in b}


def device_roofline(devices: list[Any]) -> tuple[float, float] | None:
    """(peak FLOP/s, HBM bytes/s) of one of these devices, None for a chip the table does not
    know (the CPU). libtpu's topologies show a v4 chip as two devices (one per core)."""
    chip = find_chip(devices[0].device_kind)
    if chip is None:
        return None
    return chip.roofline(devices_per_chip(devices))


def with_missed(cost: dict[str, float], program: dict[str, float]) -> dict[str, float]:
    """XLA's cost analysis of a compiled program (`flaxlm.xla_stats.cost_stats`) with the loop
    iterations it left out added back, from `program`, `flaxlm.hlo_cost.program_cost` of the
    same program (see the module docstring), and `unknown_loops`, the loops whose trip count
    could not be read (counted once)."""
    cost = dict(cost)
    for key in ("flops", "bytes_accessed"):
        if key in cost:
            cost[key] += program[f"missed_{key}"]
    if cost.get("optimal_seconds", 0) > 0 and "missed_seconds" in program:
        cost["optimal_seconds"] += program["missed_seconds"]
    cost["unknown_loops"] = program["unknown_loops"]
    return cost


def program_cost(compiled: Any, roofline: tuple[float, float] | None) -> dict[str, float]:
    """`with_missed` of a compiled program, its HLO priced at `roofline` (None: no seconds)."""
    program = hlo_cost.program_cost(compiled.as_text(), *(roofline or (None, None)))
    return with_missed(xla_stats.cost_stats(compiled), program)


def step_cost(cfg: Config, mesh: Any) -> tuple[dict[str, float], str]:
    """Per-device `flops`, `bytes_accessed` (and `optimal_seconds` on TPU) of a whole step
    of cfg on mesh, and how they were obtained (see the module docstring)."""
    layers, accum = cfg.model.n_layers, cfg.optimizer.grad_accum_steps
    micro = cfg.data.global_batch_size // accum
    first, period = layer_pattern(cfg)
    n1, n2 = first + period, first + 2 * period
    depths = [layers] if layers <= n2 else [n1, n2]

    roofline = device_roofline(list(mesh.devices.flat))

    def at_layers(k: int) -> dict[str, float]:
        """The cost at depth `layers` of one pass over k micro-batches of rows."""
        with unrolled_chunks():
            costs = [
                program_cost(Trainer(_unrolled(cfg, n, k * micro), mesh).compile_step(), roofline)
                for n in depths
            ]
        return costs[0] if len(costs) == 1 else _line(costs[0], costs[1], (layers - n1) / period)

    how = (
        f"the step unrolled ({layers} layers)"
        if len(depths) == 1
        else f"extrapolated from {n1} and {n2} unrolled layers to {layers}"
    )
    one = at_layers(1)
    if accum == 1:
        return one, how
    total = _line(one, at_layers(2), accum - 1)
    return total, f"{how}; from 1 and 2 micro-batches of {micro} rows to {accum}"
