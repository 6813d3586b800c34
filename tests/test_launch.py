"""launch/local.sh renders the command it would run."""

from __future__ import annotations

import subprocess

from conftest import REPO


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"), *args, "--dry-run"],
        capture_output=True,
        text=True,
    )


def test_local_dry_run_renders_the_train_command():
    proc = _dry_run("configs/tiny.yaml", "--cpu-devices", "8", "mesh.data=2", "train.steps=5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "env",
        "JAX_PLATFORMS=cpu",
        "XLA_FLAGS=--xla_force_host_platform_device_count=8",
        "flaxlm",
        "train",
        "--config",
        "configs/tiny.yaml",
        "mesh.data=2",
        "train.steps=5",
    ]


def test_local_without_config_fails_with_usage():
    proc = _dry_run()
    assert proc.returncode == 2 and "no config file given" in proc.stderr
