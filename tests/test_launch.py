"""The launch scripts render the commands they would run (--dry-run)."""

from __future__ import annotations

import shlex
import subprocess

from conftest import REPO


def _dry_run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "launch" / script), *args, "--dry-run"],
        capture_output=True,
        text=True,
    )


def _commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def test_local_dry_run_renders_the_train_command():
    (cmd,) = _commands(
        _dry_run("local.sh", "configs/tiny.yaml", "--cpu-devices", "8", "mesh.data=2")
    )
    assert cmd == [
        "env",
        "JAX_PLATFORMS=cpu",
        "XLA_FLAGS=--xla_force_host_platform_device_count=8",
        "flaxlm",
        "train",
        "--config",
        "configs/tiny.yaml",
        "mesh.data=2",
    ]


def test_local_processes_join_one_coordinator_with_distinct_ids():
    cmds = _commands(
        _dry_run("local.sh", "configs/tiny.yaml", "--processes", "3", "--port", "4000")
    )
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[:4] == ["flaxlm", "train", "--config", "configs/tiny.yaml"]
        assert cmd[4:] == [
            "distributed.coordinator_address=127.0.0.1:4000",
            "distributed.num_processes=3",
            f"distributed.process_id={i}",
        ]


def test_tpu_pod_runs_the_same_command_on_every_worker():
    cmds = _commands(
        _dry_run(
            "tpu_pod.sh",
            "--tpu",
            "pod",
            "--zone",
            "us-east5-a",
            "--project",
            "proj",
            "--create",
            "v5p-64",
            "configs/quickstart.yaml",
            "train.run_dir=gs://bucket/run 1",
        )
    )
    create, train = cmds
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--accelerator-type=v5p-64" in create and "--project=proj" in create
    assert train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--worker=all" in train and "--zone=us-east5-a" in train
    remote = next(a for a in train if a.startswith("--command="))[len("--command=") :]
    # The remote shell sees the override as one argument, space included.
    assert shlex.split(remote) == [
        "cd",
        "~/flaxlm",
        "&&",
        "flaxlm",
        "train",
        "--config",
        "configs/quickstart.yaml",
        "train.run_dir=gs://bucket/run 1",
    ]


def test_multislice_puts_data_parallelism_across_slices():
    create, train = _commands(
        _dry_run(
            "multislice.sh",
            *("--name", "ms", "--zone", "z", "--type", "v5p-128", "--slices", "4"),
            "configs/tiny.yaml",
        )
    )
    assert "--node-count=4" in create and "--accelerator-type=v5p-128" in create
    assert "--node=all" in train and "--worker=all" in train
    remote = next(a for a in train if a.startswith("--command="))
    assert shlex.split(remote.split("&&", 1)[1])[-1] == "mesh.dcn_data=4"


def test_slurm_renders_a_batch_script_with_one_task_per_node():
    proc = _dry_run(
        "slurm.sh", "--nodes", "2", "--partition", "gpu", "configs/tiny.yaml", "train.steps=9"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--partition=gpu", "--signal=TERM@300"):
        assert f"#SBATCH {directive}" in lines
    srun = next(shlex.split(line) for line in lines if line.startswith("srun "))
    assert srun == [
        "srun",
        *("flaxlm", "train", "--config", "configs/tiny.yaml"),
        "train.steps=9",
        "mesh.dcn_data=2",
    ]


def test_launch_scripts_name_missing_arguments():
    assert "no config file given" in _dry_run("local.sh").stderr
    for script, message in [
        ("tpu_pod.sh", "--tpu NAME and --zone ZONE are required"),
        ("multislice.sh", "--name, --zone and --type are required"),
        ("slurm.sh", "--nodes must be a positive integer"),
    ]:
        proc = _dry_run(script, "configs/tiny.yaml")
        assert proc.returncode == 2 and message in proc.stderr, (script, proc.stderr)
