"""Compiling the planner's candidates: ahead of time for a TPU topology, or on the devices at
hand; several processes at once; each program cached.

A compile yields what pricing needs and nothing else: XLA's memory analysis of the step and
its HLO text. Both are cached on disk under a key of the whole config, the target (topology
and slices, or the local device kind and count) and the versions of jax, jaxlib, libtpu and
flaxlm, so a second plan of the same model compiles only what changed. Pricing
(`flaxlm.step_time`) runs on the cached program, at the target's rates: on the CPU these are
measured (a float32 matmul and an elementwise pass over memory, shared by the host's forced
devices) and differ from run to run, so they are never part of the key.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flaxlm import __version__
from flaxlm.config import Config, to_dict


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the candidates run: a TPU topology (`v5p:4x4x4`) over `slices` slices, or the
    local devices (topology None). `rates` are per device: peak FLOP/s and HBM, ICI and DCN
    bytes per second; `overlap`: whether collectives run beside the compute."""

    topology: str | None
    slices: int
    devices: int
    device_kind: str
    rates: tuple[float, float, float, float]
    overlap: bool
    hbm_gib: float | None

    def describe(self) -> str:
        where = self.topology or f"{self.devices} x {self.device_kind}"
        return f"{self.slices} x {where}" if self.slices > 1 else where


def _versions() -> dict[str, str]:
    found = {"flaxlm": __version__}
    for package in ("jax", "jaxlib", "libtpu", "flax"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def cache_key(cfg: Config, target: Target) -> str:
    """The cache key of cfg's compiled step on target: everything that changes the program."""
    what = {
        "config": to_dict(cfg),
        "topology": target.topology,
        "slices": target.slices,
        "devices": target.devices,
        "device_kind": target.device_kind,
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def target_devices(target: Target) -> list[Any]:
    """The devices of the target: described by libtpu, or this process's."""
    import jax

    from flaxlm import aot

    if target.topology is None:
        return jax.devices()
    return aot.topology_devices(target.topology, target.slices)


def compile_program(cfg: Config, target: Target) -> dict[str, Any]:
    """Compiles cfg's train step on the target: XLA's memory analysis and the HLO text, or
    the compiler's refusal (a program that cannot fit in HBM)."""
    from flaxlm import memory
    from flaxlm.aot import compile_or_refusal
    from flaxlm.mesh import make_mesh
    from flaxlm.train import Trainer

    started = time.perf_counter()
    compiled, error = compile_or_refusal(Trainer(cfg, make_mesh(cfg, target_devices(target))))
    if error is not None:
        return {"memory": None, "error": error, "hlo": ""}
    return {
        "memory": memory.compiled_memory(compiled),
        "error": None,
        "hlo": compiled.as_text(),
        "compile_seconds": time.perf_counter() - started,
    }


def _cached(cache: Path | None, key: str) -> dict[str, Any] | None:
    if cache is None or not (cache / f"{key}.json").exists():
        return None
    found = json.loads((cache / f"{key}.json").read_text())
    hlo = cache / f"{key}.hlo.gz"
    found["hlo"] = gzip.decompress(hlo.read_bytes()).decode() if hlo.exists() else ""
    return found


def _store(cache: Path | None, key: str, result: dict[str, Any]) -> None:
    """Writes the HLO first and the record last, each by rename: a record always has its
    program, whatever interrupts the write."""
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    for name, data in (
        (f"{key}.hlo.gz", gzip.compress(result["hlo"].encode())),
        (f"{key}.json", json.dumps({k: v for k, v in result.items() if k != "hlo"}).encode()),
    ):
        partial = cache / f"{name}.{os.getpid()}.partial"
        partial.write_bytes(data)
        partial.replace(cache / name)


def compile_all(
    configs: Sequence[Config],
    target: Target,
    jobs: int,
    cache: Path | None,
    done: Callable[[int, dict[str, Any]], None],
) -> None:
    """Compiles every config on target (from the cache where it can), `jobs` processes at
    once; calls done(index, result) as each finishes."""
    keys = [cache_key(cfg, target) for cfg in configs]
    todo = []
    for i, key in enumerate(keys):
        found = _cached(cache, key)
        if found is not None:
            done(i, {**found, "cached": True})
        else:
            todo.append(i)
    if not todo:
        return
    if jobs <= 1:
        for i in todo:
            result = compile_program(configs[i], target)
            _store(cache, keys[i], result)
            done(i, {**result, "cached": False})
        return
    # Fresh interpreters (spawn: JAX cannot fork) with this process's environment, so the same
    # devices (XLA_FLAGS, JAX_PLATFORMS); each compile of a large model may hold gigabytes.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(compile_program, configs[i], target): i for i in todo}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            result = future.result()
            _store(cache, keys[i], result)
            done(i, {**result, "cached": False})
