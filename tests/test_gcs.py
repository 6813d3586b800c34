"""Run directories on an object store: a whole run on gs:// against a local GCS emulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CONFIGS, REPO, xla_flags
from etils import epath
from gcs_emulator import gcs  # noqa: F401 - the fixture
from helpers import flaxlm

pytestmark = pytest.mark.slow

TINY = (
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_prompt=",
    "train.progress_bar=false",
    "train.steps=24",
    "checkpoint.every_steps=4",
    "model.n_layers=1",
)


def _train_args(run_dir: str, corpus_cache: str) -> list[str]:
    return [
        "train", "--config", str(CONFIGS / "tiny.yaml"), f"train.run_dir={run_dir}",
        f"data.cache_dir={corpus_cache}", *TINY,
    ]  # fmt: skip


def _wait_for_checkpoint(proc: subprocess.Popen, run: epath.Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early:\n{proc.stderr.read()[-3000:]}"
        if (run / "checkpoints" / str(step) / "commit_success.txt").exists():
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint {step} in 300 s")


def _eval(run_dir: str) -> dict:
    return json.loads(flaxlm("eval", "--checkpoint", run_dir, devices=1).stdout)


def test_a_run_on_gcs_is_killed_resumes_exactly_then_evaluates_exports_and_generates(
    tmp_path,
    corpus_cache,
    gcs,  # noqa: F811
):
    reference = tmp_path / "reference"
    flaxlm(*_train_args(str(reference), corpus_cache), devices=1)

    url = "gs://flaxlm-test/run"
    run = epath.Path(url)
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flaxlm.cli", *_train_args(url, corpus_cache)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_checkpoint(proc, run, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "24").exists(), "the run finished before it was killed"

    resumed = flaxlm(*_train_args(url, corpus_cache), devices=1)
    assert f"resumed from {url}/checkpoints/" in resumed.stderr
    # Every file of the run directory is on the object store; none went to a local ./gs:/.
    assert not (REPO / "gs:").exists()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 24

    # Exact resume: the same final evaluation as the uninterrupted local run.
    expected = _eval(str(reference))
    assert _eval(url) == {**expected}
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["final_eval"]["loss"]
        == json.loads((reference / "summary.json").read_text())["final_eval"]["loss"]
    )

    flaxlm("export", "--checkpoint", url, f"{url}-export", devices=1)
    prompt = ("generate", "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")
    local_text = flaxlm(*prompt, "--checkpoint", str(reference), devices=1).stdout
    assert flaxlm(*prompt, "--checkpoint", f"{url}-export", devices=1).stdout == local_text

    table = flaxlm("eval", "--checkpoint", url, "--all-steps", devices=1)
    steps = [json.loads(line)["step"] for line in table.stdout.splitlines()]
    csv = (run / "eval" / "table.csv").read_text().splitlines()
    assert len(csv) == len(steps) + 1 and (run / "eval" / "eval_loss.png").exists()

    hf = tmp_path / "hf"
    flaxlm("convert", "to-hf", url, str(hf), devices=1)
    assert (hf / "model.safetensors").is_file()
    assert max(steps) == 24
