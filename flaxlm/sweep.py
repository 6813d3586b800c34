"""Benchmark sweeps over mesh shapes and model sizes: `flaxlm sweep mesh|models`.

Each point of a sweep is one `flaxlm.bench.bench` record, run one after the other in this
process (so they share the measured CPU peak and compete with nothing of their own). Results
are written as `<name>.csv`, `<name>.json` and `<name>.png` in an output directory:

- `mesh`: meshes given as DATAxFSDPxTENSOR (`8x1x1`, `1x8x1`, `2x2x2`, `1x1x1`, ...), each on
  the first data*fsdp*tensor devices; the plot shows tokens/s against devices with the ideal
  line (the fewest-device throughput times the device ratio).
- `models`: model presets (YAML files with a `model:` section, merged over the config); the plot
  shows MFU against parameters.

Progress goes to stderr (tqdm), results to the files and, one JSON line per point, to stdout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax

from flaxlm import config as config_lib
from flaxlm import report
from flaxlm.bench import bench
from flaxlm.config import MESH_AXES, Config, ConfigError

Record = dict[str, Any]


def parse_mesh(spec: str) -> dict[str, int]:
    """'2x4x1' -> {'data': 2, 'fsdp': 4, 'context': 1, 'tensor': 1, 'expert': 1}; a fourth size
    is the expert axis, a fifth the context axis."""
    order = ("data", "fsdp", "tensor", "expert", "context")
    parts = spec.lower().split("x")
    if not 3 <= len(parts) <= len(order) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"mesh {spec!r} is not DATAxFSDPxTENSOR[xEXPERT[xCONTEXT]] with positive sizes (for "
            "example 2x2x2)"
        )
    sizes = dict(zip(order, map(int, parts + ["1"] * (len(order) - len(parts))), strict=True))
    return {a: sizes[a] for a in MESH_AXES}


def _run_points(points: Sequence[tuple[str, Callable[[], Record]]], desc: str) -> Iterator[Record]:
    """Runs each (label, thunk), showing progress on stderr; yields the records."""
    bar = report.progress(points, desc=desc, unit="point")
    for label, run in bar:
        bar.set_postfix_str(label)
        record = run()
        report.note(
            bar,
            f"{label}: {record['tokens_per_second']:,.0f} tokens/s, "
            f"MFU {record['mfu'] or float('nan'):.3f}",
        )
        yield record


def mesh_sweep(
    cfg: Config,
    meshes: Sequence[str],
    steps: int = 10,
    warmup: int = 2,
    per_device_batch: int | None = None,
) -> Iterator[Record]:
    """Benchmarks cfg on each mesh; the global batch stays cfg's unless per_device_batch is set
    (then it is per_device_batch x data x fsdp: weak scaling)."""
    available = jax.devices()
    points = []
    for spec in meshes:
        sizes = parse_mesh(spec)
        n = math.prod(sizes.values())
        if n > len(available):
            raise ConfigError(
                f"mesh {spec} needs {n} devices but {len(available)} are available (on CPU, set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n})"
            )
        data = {}
        if per_device_batch:
            data["global_batch_size"] = per_device_batch * sizes["data"] * sizes["fsdp"]
        point_cfg = config_lib.replace(cfg, mesh=sizes, data=data)
        points.append(
            (spec, lambda c=point_cfg, d=available[:n]: bench(c, steps, warmup, devices=d))
        )
    for (spec, _), record in zip(points, _run_points(points, "mesh sweep"), strict=True):
        yield {"mesh_spec": spec, **record}


def model_sweep(
    config_path: str | Path,
    presets: Sequence[str | Path],
    overrides: Sequence[str] = (),
    steps: int = 10,
    warmup: int = 2,
) -> Iterator[Record]:
    """Benchmarks the config with each model preset merged over it (then the overrides)."""
    cfgs = [config_lib.load_files([config_path, p], overrides) for p in presets]
    points = [
        (Path(p).stem, lambda c=c: bench(c, steps, warmup))
        for p, c in zip(presets, cfgs, strict=True)
    ]
    for (name, _), record in zip(points, _run_points(points, "model sweep"), strict=True):
        yield {"model_name": name, **record}


def plot_mesh(records: Sequence[Record], path: Path) -> None:
    """Tokens/s against devices, one labelled point per mesh, with the ideal scaling line."""
    with report.figure(path, figsize=(6, 4)) as ax:
        devices = [r["devices"] for r in records]
        throughput = [r["tokens_per_second"] for r in records]
        ax.scatter(devices, throughput, zorder=3)
        for r in records:
            ax.annotate(
                r["mesh_spec"], (r["devices"], r["tokens_per_second"]), fontsize=8,
                xytext=(4, 4), textcoords="offset points",
            )  # fmt: skip
        base_n = min(devices)
        base = max(t for d, t in zip(devices, throughput, strict=True) if d == base_n)
        xs = sorted(set(devices))
        ax.plot(xs, [base * n / base_n for n in xs], "--", color="gray", label="ideal (linear)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("devices (mesh data x fsdp x tensor)")
        ax.set_ylabel("tokens / s (global)")
        first = records[0]
        ax.set_title(
            f"{first['params'] / 1e6:.1f}M params, {first['platform']}: throughput against devices",
            fontsize=10,
        )
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)


def plot_models(records: Sequence[Record], path: Path) -> None:
    """MFU against parameters (log scale), one labelled point per model."""
    with report.figure(path, figsize=(6, 4)) as ax:
        params = [r["params"] for r in records]
        mfu = [r["mfu"] if r["mfu"] is not None else math.nan for r in records]
        ax.plot(params, mfu, "o-")
        for r, p, m in zip(records, params, mfu, strict=True):
            ax.annotate(
                r["model_name"], (p, m), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"MFU ({records[0]['peak_source']})")
        first = records[0]
        ax.set_title(
            f"MFU against model size, {first['devices']} {first['platform']} devices", fontsize=10
        )
        ax.grid(True, which="both", alpha=0.3)


def write_sweep(records: Sequence[Record], directory: Path, kind: str) -> list[Path]:
    """Writes kind.csv, kind.json and kind.png for a finished sweep."""
    json_path, csv_path = report.write_table(records, directory, kind)
    png = directory / f"{kind}.png"
    (plot_mesh if kind == "mesh" else plot_models)(records, png)
    return [csv_path, json_path, png]
