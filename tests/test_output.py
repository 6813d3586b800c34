"""Output hygiene: a machine with libtpu installed and no TPU prints no TPU start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_no_libtpu_noise_without_tpus():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
    code = "import flaxlm, jax; print(jax.devices()[0].platform)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("cpu", "gpu", "tpu")
    for noise in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "accelerator type", "E0000"):
        assert noise not in proc.stderr, proc.stderr
