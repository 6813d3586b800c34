"""What a plan prints and writes: the ranked table, memory against time for every compiled
candidate (PNG), one JSON line per candidate, the winner as a ready command, and its config."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flaxlm.config import Config, ConfigError, portable, to_yaml
from flaxlm.plan.compile import Target
from flaxlm.plan.planner import PlanResult
from flaxlm.report import figure, strict_json

_COLUMNS = (
    "rank",
    "mesh",
    "remat",
    "micro x accum",
    "attention",
    "GiB/device",
    "headroom",
    "step s",
    "MFU",
    "collective GB",
)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cells(row: dict[str, Any]) -> list[str]:
    micro = row["micro_batch_per_device"]
    micro_text = f"{micro:g}" if micro >= 1 else f"1/{round(1 / micro)}"
    mfu = row.get("estimated_mfu")
    collective = row.get("collective_bytes")
    return [
        str(row["rank"]),
        row["layout"],
        row["remat"],
        f"{micro_text} x {row['grad_accum_steps']}",
        row["attention"] + ("" if row["scan_layers"] else " unrolled"),
        _num(row["memory_gib"]),
        _num(row["headroom_gib"]) if row["fits"] else "no fit",
        _num(row.get("estimated_step_seconds"), 4),
        "-" if mfu is None else f"{100 * mfu:.1f}%",
        _num(collective / 1e9 if collective is not None else None),
    ]


def table(result: PlanResult, top: int | None = None) -> str:
    """The ranked candidates as a Markdown table (the best `top`, or all)."""
    rows = [_cells(r) for r in result.rows[:top]]
    header = list(_COLUMNS)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    summary = (
        f"{result.target.describe()}: {result.enumerated} candidates divide the model and the "
        f"batch, {result.pruned} cannot fit by the memory model, {result.not_compiled} "
        f"left uncompiled (the slowest by the analytic estimate), {len(result.rows)} compiled"
    )
    return "\n".join([summary, "", *lines])


def json_lines(result: PlanResult) -> list[str]:
    """One strict JSON object per compiled candidate, best first."""
    return [strict_json(row) for row in result.rows]


def plot(result: PlanResult, path: Path) -> Path:
    """Per-device memory against estimated step time, every compiled candidate; the HBM as a
    line; the winner circled."""
    rows = [r for r in result.rows if r["memory_gib"] and r.get("estimated_step_seconds")]
    with figure(path, figsize=(7, 4.5)) as ax:
        for fits, colour, name in ((True, "tab:blue", "fits"), (False, "tab:red", "does not fit")):
            chosen = [r for r in rows if r["fits"] == fits]
            ax.scatter(
                [r["estimated_step_seconds"] for r in chosen],
                [r["memory_gib"] for r in chosen],
                c=colour,
                label=name,
                s=18,
            )
        if result.target.hbm_gib:
            ax.axhline(result.target.hbm_gib, color="gray", linestyle="--", label="HBM per device")
        best = result.rows[0] if result.rows and result.rows[0]["fits"] else None
        if best is not None and best.get("estimated_step_seconds"):
            ax.scatter(
                [best["estimated_step_seconds"]],
                [best["memory_gib"]],
                s=160,
                facecolors="none",
                edgecolors="black",
                label=f"plan: {best['label']}",
            )
        ax.set_xlabel("estimated step time (s)")
        ax.set_ylabel("memory per device (GiB, XLA)")
        ax.set_title(f"flaxlm plan: {result.target.describe()}")
        ax.legend(fontsize=7)
    return path


def commands(result: PlanResult, config_files: Sequence[str], overrides: Sequence[str]) -> str:
    """The winning layout as ready commands: `flaxlm train` here, and on the TPU pod or its
    slices, the launch script."""
    if not result.rows or not result.rows[0]["fits"]:
        return "no compiled candidate fits: raise --compile, lower the batch or add devices"
    configs = " ".join(f"--config {shlex.quote(c)}" for c in config_files)
    layout = " ".join(shlex.quote(o) for o in [*overrides, *result.rows[0]["overrides"]])
    lines = [f"flaxlm train {configs} {layout}"]
    target, files = result.target, " ".join(shlex.quote(c) for c in config_files)
    if target.topology and target.slices > 1:
        pod = _pod_type(target)
        lines.append(
            f"launch/multislice.sh --name NAME --zone ZONE --type {pod} --slices "
            f"{target.slices} {files} {layout}"
        )
    elif target.topology:
        lines.append(f"launch/tpu_pod.sh --tpu NAME --zone ZONE {files} {layout}")
    return "\n".join(lines)


def _pod_type(target: Target) -> str:
    """The Cloud TPU accelerator type of a topology: v5p counts TensorCores (two per chip)."""
    from flaxlm.aot import parse_topology

    generation, chips = parse_topology(target.topology)
    return f"{generation}-{chips * 2 if generation in ('v4', 'v5p') else chips}"


def apply(result: PlanResult, cfg: Config, path: Path) -> Path:
    """Writes cfg laid out as the winning candidate, as a config file `flaxlm train` takes."""
    from flaxlm.config import from_dict, to_dict

    if not result.rows or not result.rows[0]["fits"]:
        raise ConfigError(
            f"no compiled candidate fits, so --apply {path} was not written: raise --compile, "
            "lower the batch or add devices"
        )
    chosen = from_dict(to_dict(cfg), result.rows[0]["overrides"])
    path.write_text(to_yaml(portable(chosen)))
    return path
