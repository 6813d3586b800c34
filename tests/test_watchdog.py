"""The hang watchdog: a stalled loop (a frozen peer, a hung checkpoint save) ends the job with
every thread's stack written down, and the relaunched job resumes exactly."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import CONFIGS, REPO
from helpers import free_port, train_losses

from flaxlm.config import TrainConfig
from flaxlm.watchdog import Watchdog


def _watchdog(tmp_path, **train) -> tuple[Watchdog, threading.Event]:
    fired = threading.Event()
    cfg = dataclasses.replace(TrainConfig(), run_dir=str(tmp_path), **train)
    return Watchdog(cfg, 0, on_stall=fired.set, poll_seconds=0.02), fired


def test_a_hung_checkpoint_save_fires_after_its_allowance_with_stacks(tmp_path):
    dog, fired = _watchdog(tmp_path, hang_timeout_s=60, hang_allowance_s=60, hang_checkpoint_s=0.3)
    try:
        dog.beat(1)
        dog.beat(2)
        with dog.phase("checkpoint"):
            start = time.monotonic()
            assert fired.wait(5), "the watchdog did not fire in a hung save"
            elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 2
        (stacks,) = (tmp_path / "stacks").iterdir()
        text = stacks.read_text()
        assert "in checkpoint" in text and "last step 2" in text
        # faulthandler lists every thread, the stalled main thread among them.
        assert "test_a_hung_checkpoint_save_fires" in text and "Thread 0x" in text
    finally:
        dog.close()


def test_steps_reset_the_timer_and_compile_gets_the_allowance(tmp_path):
    dog, fired = _watchdog(tmp_path, hang_timeout_s=0.3, hang_allowance_s=1.5)
    try:
        time.sleep(0.6)  # startup: within the allowance
        assert not fired.is_set()
        dog.beat(1)  # the first step compiled; its execution is not timed yet
        assert dog.limit() == 1.5
        for step in range(2, 8):
            time.sleep(0.1)
            dog.beat(step)
        assert not fired.is_set() and dog.limit() == 0.3
        assert fired.wait(2)  # no more steps: a stall
    finally:
        dog.close()


def test_the_automatic_timeout_is_a_multiple_of_the_median_step(tmp_path):
    dog, _ = _watchdog(tmp_path, watchdog=False)
    dog.phase_name = None  # past startup
    dog.step_seconds = [50.0, 1.0, 2.0, 3.0, 400.0]
    assert dog.limit() == 300.0  # never under the floor
    dog.step_seconds = [50.0, 20.0, 30.0, 40.0, 30.0]
    assert dog.limit() == 20 * 30.0
    dog.phase_name = "evaluation"
    assert dog.limit() == TrainConfig().hang_allowance_s


def _process(root: psutil.Process, process_id: int) -> psutil.Process:
    for child in root.children(recursive=True):
        cmdline = " ".join(child.cmdline())
        if "flaxlm" in cmdline and f"distributed.process_id={process_id}" in cmdline:
            return child
    raise AssertionError(f"process {process_id} not found")


@pytest.mark.slow
def test_a_frozen_process_ends_the_job_and_the_relaunch_resumes_exactly(tmp_path, corpus_cache):
    run = tmp_path / "run"
    timeout = 8
    launch = [
        *("bash", str(REPO / "launch" / "local.sh"), str(CONFIGS / "tiny.yaml")),
        *("--processes", "2", "--cpu-devices", "2", "--grace", "3"),
        *(f"data.cache_dir={corpus_cache}", f"train.run_dir={run}", "mesh.dcn_data=2"),
        *("train.progress_bar=false", "train.tensorboard=false", "train.log_every=1"),
        *("train.eval_every=0", "train.sample_prompt=", "train.steps=24"),
        *("checkpoint.every_steps=4", "checkpoint.async_save=false"),
        f"train.hang_timeout_s={timeout}",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def start() -> subprocess.Popen:
        args = [*launch[:3], "--port", str(free_port()), *launch[3:]]
        return subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)

    job = start()
    while not (run / "metrics.jsonl").exists() or max(train_losses(run), default=0) < 5:
        assert job.poll() is None, job.stderr.read()[-3000:]
        time.sleep(0.02)
    frozen = _process(psutil.Process(job.pid), 1)
    frozen.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    _, stderr = job.communicate(timeout=120)
    time_to_exit = time.monotonic() - frozen_at
    print(f"watchdog: job ended {time_to_exit:.1f} s after the freeze (timeout {timeout} s)")
    assert job.returncode == 75, stderr[-3000:]
    assert timeout <= time_to_exit < timeout + 20
    assert not psutil.pid_exists(frozen.pid) or frozen.status() == psutil.STATUS_ZOMBIE
    stacks = list((run / "stacks").glob("process-0-*.txt"))
    assert stacks and "between steps" in stacks[0].read_text()
    assert "Thread 0x" in stacks[0].read_text() and "ending the others" in stderr
    first = train_losses(run)
    assert max(first) < 24

    job = start()
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    resumed_at = int(stderr.split("resumed from")[1].split("at step ")[1].split()[0])
    assert resumed_at < max(first)
    redone = range(resumed_at + 1, max(first) + 1)
    again = train_losses_all(run)
    for step in redone:  # the same losses as before the freeze, when the run was healthy
        np.testing.assert_allclose(again[step][-1], again[step][0], rtol=1e-6, err_msg=step)
    assert max(again) == 24


def train_losses_all(run) -> dict[int, list[float]]:
    """Every loss record of each step, in the order written (a redone step has several)."""
    import json

    out: dict[int, list[float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out
