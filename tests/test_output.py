"""Output hygiene: no TPU start-up errors without TPUs; several --config files compose."""

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


def test_several_config_files_compose_in_order(tmp_path, capsys):
    from conftest import CONFIGS

    from flaxlm import commands
    from flaxlm.cli import parser

    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train:\n  steps: 7\n")
    args = parser().parse_args(
        ["train", "--config", str(CONFIGS / "tiny.yaml"), "--config", str(overlay), "train.seed=3"]
    )
    cfg = commands._config(args)
    assert (cfg.train.steps, cfg.train.seed, cfg.data.seq_len) == (7, 3, 64)  # tiny's seq_len
    from flaxlm.cli import main

    assert main(["scaling", "--config", str(overlay), "--config", str(overlay)]) == 2
    assert "takes one --config" in capsys.readouterr().err
