"""The goodput ledger: a job's wall time by category, kept across restarts, with the steps that
a restart had to compute again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from helpers import flaxlm, patched_train, train_losses

from flaxlm import goodput


def _write_losses(run_dir, steps) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")


def test_a_restart_books_downtime_and_the_steps_it_recomputes(tmp_path):
    first = goodput.Ledger(tmp_path, True, time.time())
    with first.phase("restore"):
        time.sleep(0.01)
    for step in range(1, 9):
        first.step(step, data_wait_seconds=0.0)
    first.save(force=True)  # killed after step 8 was dispatched: 7 known to be done
    _write_losses(tmp_path, range(1, 9))  # ... but metrics.jsonl shows step 8 done too
    assert goodput.load(tmp_path)["last_step"] == 7

    killed_at = goodput.load(tmp_path)["updated_at"]
    second = goodput.Ledger(tmp_path, True, killed_at + 5.0)  # restarted 5 s later
    assert second.high_water == 8
    for step in range(6, 11):  # resumed from the checkpoint of step 5
        second.step(step, data_wait_seconds=0.001)
    second.finish(10)
    r = goodput.load(tmp_path)
    assert r["attempts"] == 2
    assert r["recomputed_steps"] == 3  # 6, 7 and 8
    assert r["productive_steps"] == 8 + 2  # steps 1..8 of the first attempt, 9 and 10
    assert r["seconds"]["downtime"] == pytest.approx(5.0)
    assert r["seconds"]["compilation"] > 0 and r["seconds"]["data_wait"] > 0
    assert r["wall_seconds"] == pytest.approx(sum(r["seconds"].values()))
    assert 0 < r["goodput"] < 1


def test_the_process_start_time_is_exact_to_a_clock_tick():
    # A restart's downtime runs from the last record of the attempt before to this start, often
    # a fraction of a second; psutil's create_time is up to a second early (whole-second boot
    # time), which booked such gaps as none.
    before = time.time()
    code = "from flaxlm.goodput import process_start_time; print(repr(process_start_time()))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert before - 0.02 <= float(out.stdout) <= before + 1.0  # a tick is 0.01 s


def _attempt(run_dir, corpus_cache, *overrides, patch: str = "") -> subprocess.Popen:
    cmd, env = patched_train(run_dir, corpus_cache, "train.steps=16", *overrides, patch=patch)
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# The second attempt's save of step 10 (or later) never returns, as on a hung file system.
HANG_SAVES = """
import flaxlm.checkpoint as c
save = c.Checkpointer.save
c.Checkpointer.save = lambda self, n, *a: time.sleep(3600) if n >= 10 else save(self, n, *a)
"""


@pytest.mark.slow
def test_a_run_killed_twice_counts_the_steps_it_redid(tmp_path, corpus_cache):
    run = tmp_path / "run"
    # 1: SIGKILL once step 7 is logged.
    job = _attempt(run, corpus_cache)
    while not (run / "metrics.jsonl").exists() or max(train_losses(run), default=0) < 7:
        assert job.poll() is None, job.stderr.read()[-3000:]
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    # 2: a checkpoint save hangs; the watchdog ends the run with the stacks written.
    job = _attempt(run, corpus_cache, "train.hang_checkpoint_s=5", patch=HANG_SAVES)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 75, stderr[-3000:]
    assert "no progress" in stderr and "in checkpoint" in stderr
    stacks = next((run / "stacks").glob("process-0-*.txt")).read_text()
    assert "sleep" in stacks or "<lambda>" in stacks  # the hung save is on the main stack
    # 3: runs to the end.
    job = _attempt(run, corpus_cache)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "loss" in r]
    redone = len(logged) - len(set(logged))  # steps whose loss was logged more than once
    ledger = json.loads(flaxlm("goodput", str(run)).stdout)
    print("goodput.json of a run killed twice:", json.dumps(ledger, indent=1))
    assert redone > 0 and ledger["recomputed_steps"] == redone
    # A SIGKILL loses the bookings since the ledger's last write (at most a second), never
    # the recomputed steps, which come from what was logged.
    booked = ledger["productive_steps"] + ledger["recomputed_steps"]
    assert len(set(logged)) <= booked <= len(logged) + 2
    assert ledger["attempts"] == 3 and ledger["seconds"]["downtime"] > 0
    assert ledger["seconds"]["checkpoint"] >= 5  # the hung save, until the watchdog fired
    assert (run / "goodput.png").stat().st_size > 0
