"""Multi-host training for real: 2 processes x 4 CPU devices joined by jax.distributed (gloo).

One uninterrupted 2-process run is the oracle. Its checkpoint from the middle of the run is
restored (a) by 2 processes x 4 devices, (b) by 1 process x 8 devices and (c) by 1 process x 4
devices on another mesh; the step after the checkpoint must have the same loss in every case:
the train state is resharded onto the new mesh and the data position carries over.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import CONFIGS, REPO
from helpers import flaxlm, flaxlm_processes, free_port, train_losses

pytestmark = pytest.mark.slow

COMMON = [
    "--config",
    str(CONFIGS / "tiny.yaml"),
    "train.progress_bar=false",
    "train.tensorboard=false",
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_prompt=",
    "train.steps=4",
    "checkpoint.every_steps=3",
    "checkpoint.async_save=true",
]


def _resume_copy(run, dst):
    """The run directory as it was right after the step-3 checkpoint."""
    shutil.copytree(run, dst)
    shutil.rmtree(dst / "checkpoints" / "4")
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if '"step": 4' not in line]
    (dst / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return dst


def test_two_processes_train_save_and_restore_on_other_layouts(tmp_path, corpus_cache):
    run = tmp_path / "run"
    data = f"data.cache_dir={corpus_cache}"
    # Launched as users do (launch/local.sh), data parallel across the processes (each is a
    # slice on the DCN axis), FSDP within each.
    launch = [
        *("bash", str(REPO / "launch" / "local.sh"), str(CONFIGS / "tiny.yaml")),
        *("--processes", "2", "--cpu-devices", "4", "--port", str(free_port())),
        *COMMON[2:],
        *(data, f"train.run_dir={run}", "mesh.dcn_data=2"),
    ]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Results once, from the first process; gloo's own lines go to stderr.
    assert proc.stdout.count("trained steps 0..4") == 1, proc.stdout
    assert "[Gloo]" not in proc.stdout and "[Gloo]" in proc.stderr
    oracle = train_losses(run)
    assert sorted(oracle) == [1, 2, 3, 4]
    ckpt = run / "checkpoints" / "3"
    assert (ckpt / "state").is_dir() and (ckpt / "data").is_dir()

    layouts = {
        "2x4 data over DCN": (2, 4, ["mesh.dcn_data=2"]),
        "1x8 fsdp": (1, 8, []),
        "1x4 data=2 tensor=2": (1, 4, ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2"]),
    }
    for name, (processes, devices, mesh) in layouts.items():
        resumed = _resume_copy(run, tmp_path / name.replace(" ", "_"))
        args = ["train", *COMMON, data, f"train.run_dir={resumed}", *mesh]
        if processes == 1:
            proc = flaxlm(*args, devices=devices)
            stderr = proc.stderr
        else:
            stderr = flaxlm_processes(processes, devices, *args)[0].stderr
        assert "resumed from" in stderr and "at step 3" in stderr, name
        losses = train_losses(resumed)
        np.testing.assert_allclose(losses[4], oracle[4], rtol=2e-5, err_msg=name)
        # The step before differs from the one after (a stale batch would show up here).
        assert losses[4] != oracle[3]


def test_two_processes_evaluate_as_one_job_and_print_once(tmp_path, corpus_cache):
    run = tmp_path / "run"
    data = f"data.cache_dir={corpus_cache}"
    flaxlm("train", *COMMON, data, f"train.run_dir={run}", devices=8)
    (single,) = [
        json.loads(line) for line in flaxlm("eval", "--checkpoint", str(run)).stdout.splitlines()
    ]
    first, second = flaxlm_processes(2, 4, "eval", "--checkpoint", str(run))
    assert second.stdout == "" and "[Gloo]" not in first.stdout
    (joined,) = [json.loads(line) for line in first.stdout.splitlines()]
    # One job over both processes' devices: the same held-out tokens, the same loss.
    assert joined["step"] == single["step"] == 4 and joined["tokens"] == single["tokens"]
    np.testing.assert_allclose(joined["loss"], single["loss"], rtol=1e-5)
