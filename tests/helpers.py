"""Running the `flaxlm` command line in a fresh process, as users and launchers do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS, REPO, xla_flags


def flaxlm(*args: str, devices: int = 8, check: bool = True, timeout: int = 600):
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
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


def patched_train(
    run_dir: Path, corpus_cache: str, *overrides: str, patch: str = ""
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `flaxlm train` on configs/tiny.yaml (2 CPU devices, every
    step logged, no eval, sample or TensorBoard, a checkpoint every 5 steps) in a fresh Python
    that first runs `patch`: code that monkeypatches flaxlm to stage a fault."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    args = [
        "train", "--config", str(CONFIGS / "tiny.yaml"), f"train.run_dir={run_dir}",
        f"data.cache_dir={corpus_cache}", "train.progress_bar=false", "train.log_every=1",
        "train.eval_every=0", "train.sample_prompt=", "train.tensorboard=false",
        "checkpoint.every_steps=5", *overrides,
    ]  # fmt: skip
    code = f"import sys, time\n{patch}\nfrom flaxlm.cli import main\nsys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args], env


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flaxlm_processes(
    num_processes: int, devices_per_process: int, *args: str, timeout: int = 600
) -> list[subprocess.CompletedProcess]:
    """Runs `flaxlm ARGS` as one multi-process job on this machine (gloo between processes)."""
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices_per_process)
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flaxlm.cli",
                *args,
                f"distributed.coordinator_address=127.0.0.1:{port}",
                f"distributed.num_processes={num_processes}",
                f"distributed.process_id={i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for i in range(num_processes)
    ]
    results = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
            if p.returncode != 0:
                raise AssertionError(f"process {i} of flaxlm {args[0]} failed:\n{err[-4000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results
