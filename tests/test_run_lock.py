"""The lock of a run directory: a second `train` on a live run's directory is refused (exit 2)
and the first run is untouched; a lock left by a dead process is taken over."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import CONFIGS, REPO
from helpers import flaxlm, train_losses

from flaxlm.config import ConfigError
from flaxlm.run_lock import LOCK_FILE, STALE_SECONDS, RunLock


def _write_lock(run_dir, **record):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": 1, "token": "x", "heartbeat": time.time()}
    (run_dir / LOCK_FILE).write_text(json.dumps({**holder, **record}))


def test_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        _write_lock(tmp_path, pid=live.pid)
        with pytest.raises(
            ConfigError, match=f"in use by another training run \\(process {live.pid}"
        ):
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live.pid  # untouched
    finally:
        live.kill()
        live.wait()
    _write_lock(tmp_path, pid=dead.pid)
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    _write_lock(tmp_path, host="elsewhere", pid=123)
    with pytest.raises(ConfigError, match="on elsewhere"):
        RunLock(tmp_path).acquire()
    _write_lock(tmp_path, host="elsewhere", pid=123, heartbeat=time.time() - STALE_SECONDS - 1)
    RunLock(tmp_path).acquire().release()


@pytest.mark.slow
def test_a_second_train_on_a_live_runs_directory_exits_2_and_leaves_it_alone(
    tmp_path, corpus_cache
):
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "flaxlm.cli", "train", "--config", str(CONFIGS / "tiny.yaml"),
        f"train.run_dir={run}", f"data.cache_dir={corpus_cache}", "train.progress_bar=false",
        "train.steps=100000", "checkpoint.every_steps=5", "train.log_every=1", "train.eval_every=0",
        "train.sample_prompt=", "train.tensorboard=false", "model.n_layers=1",
    ]  # fmt: skip
    first = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and train_losses(run)):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)

    second = flaxlm(*args[3:], devices=1, check=False)
    assert second.returncode == 2, second.stderr[-2000:]
    assert "in use by another training run" in second.stderr
    assert "Traceback" not in second.stderr

    # The first run goes on (and its checkpoints with it) until it is told to stop.
    reached = max(train_losses(run))
    while max(train_losses(run)) < reached + 10:
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 143, stderr[-2000:]
    logged = sorted(train_losses(run))
    assert logged == list(range(1, logged[-1] + 1))  # no step lost or written twice
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] >= reached + 10
    assert not (run / LOCK_FILE).exists()
