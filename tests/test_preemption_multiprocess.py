"""The multi-process preemption path: SIGTERM to one process of a 2-process job reaches every
process through JAX's preemption sync point, so all of them save the same step and stop, and
the relaunched job resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
from conftest import CONFIGS, REPO
from helpers import free_port, train_losses

pytestmark = pytest.mark.slow


def test_sigterm_to_one_process_saves_the_same_step_on_all(tmp_path, corpus_cache):
    run = tmp_path / "run"
    args = [
        *("bash", str(REPO / "launch" / "local.sh"), str(CONFIGS / "tiny.yaml")),
        *("--processes", "2", "--cpu-devices", "2", "--grace", "30"),
        *(f"data.cache_dir={corpus_cache}", f"train.run_dir={run}", "mesh.dcn_data=2"),
        *("train.progress_bar=false", "train.tensorboard=false", "train.log_every=1"),
        *("train.eval_every=0", "train.sample_prompt=", "train.steps=24"),
        "checkpoint.every_steps=100",  # only the preemption saves before the end
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def launch() -> subprocess.Popen:
        port = ["--port", str(free_port())]
        return subprocess.Popen(
            [*args[:3], *port, *args[3:]], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
        )

    job = launch()
    while not (run / "metrics.jsonl").exists() or max(train_losses(run), default=0) < 4:
        assert job.poll() is None, job.stderr.read()[-3000:]
        time.sleep(0.02)
    (second,) = [
        p
        for p in psutil.Process(job.pid).children(recursive=True)
        if "distributed.process_id=1" in " ".join(p.cmdline()) and "flaxlm" in " ".join(p.cmdline())
    ]
    second.send_signal(signal.SIGTERM)  # only process 1 is told
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 143, stderr[-3000:]
    (saved,) = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert 4 <= saved < 24
    # Both processes stopped after saving that same step.
    assert stderr.count(f"stopped at step {saved} on preemption notice") == 2, stderr[-3000:]

    job = launch()
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    assert f"at step {saved}" in stderr
    assert max(train_losses(run)) == 24
