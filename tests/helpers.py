"""Running the `flaxlm` command line in a fresh process, as users and launchers do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS, REPO


def flaxlm(*args: str, devices: int = 8, check: bool = True, timeout: int = 600):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "flaxlm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"flaxlm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


def train_tiny(run_dir: Path, corpus_cache: str, *overrides: str, devices: int = 8):
    return flaxlm(
        "train",
        "--config",
        str(CONFIGS / "tiny.yaml"),
        f"train.run_dir={run_dir}",
        f"data.cache_dir={corpus_cache}",
        "train.progress_bar=false",
        *overrides,
        devices=devices,
    )


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}
