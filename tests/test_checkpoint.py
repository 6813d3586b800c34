"""Checkpoints: a run restored in a new process continues exactly as if it had never stopped."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import CONFIGS
from helpers import flaxlm, train_losses, train_tiny

pytestmark = pytest.mark.slow

COMMON = (
    "train.steps=6",
    "checkpoint.every_steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_prompt=",
    "train.tensorboard=false",
)


def _stopped_at_step_3(full_run, target):
    """A copy of a run directory as it was right after step 3 (its config and checkpoint 3)."""
    target.mkdir()
    shutil.copy(full_run / "config.yaml", target / "config.yaml")
    shutil.copytree(full_run / "checkpoints" / "3", target / "checkpoints" / "3")
    return target


def test_resume_in_a_new_process_continues_exactly(tmp_path, corpus_cache):
    full = tmp_path / "full"
    train_tiny(full, corpus_cache, *COMMON)
    expected = train_losses(full)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert {p.name for p in (full / "checkpoints").iterdir() if p.name.isdigit()} == {"3", "6"}

    resumed = _stopped_at_step_3(full, tmp_path / "resumed")
    proc = train_tiny(resumed, corpus_cache, *COMMON)
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    got = train_losses(resumed)
    assert sorted(got) == [4, 5, 6]  # it did not redo steps 1..3
    # Same state, same data position, same program: bit-identical losses on CPU.
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]


def test_resume_onto_another_mesh_and_device_count(tmp_path, corpus_cache):
    full = tmp_path / "full"
    train_tiny(full, corpus_cache, *COMMON, "mesh.data=8", "mesh.fsdp=1")
    expected = train_losses(full)
    resumed = _stopped_at_step_3(full, tmp_path / "resumed")
    # 4 devices, tensor-parallel instead of data-parallel: the arrays are resharded on restore.
    train_tiny(
        resumed, corpus_cache, *COMMON, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", devices=4
    )
    got = train_losses(resumed)
    np.testing.assert_allclose(
        [got[s] for s in (4, 5, 6)], [expected[s] for s in (4, 5, 6)], rtol=1e-5
    )


def test_resuming_with_another_model_is_refused(tmp_path, corpus_cache):
    run = tmp_path / "run"
    train_tiny(run, corpus_cache, *COMMON)
    proc = flaxlm(
        "train",
        "--config",
        str(CONFIGS / "tiny.yaml"),
        f"train.run_dir={run}",
        f"data.cache_dir={corpus_cache}",
        "model.d_model=128",
        check=False,
    )
    assert proc.returncode == 2
    assert "model.d_model: 64 -> 128" in proc.stderr


def test_keep_policy_keeps_the_last_n_and_every_mth(tmp_path, corpus_cache):
    from flaxlm import config, loop
    from flaxlm.checkpoint import Checkpointer

    cfg = config.load(
        CONFIGS / "tiny.yaml",
        [f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={corpus_cache}", *COMMON[2:],
         "train.progress_bar=false", "train.steps=12", "checkpoint.every_steps=2",
         "checkpoint.max_to_keep=2", "checkpoint.keep_every=4"],
    )  # fmt: skip
    loop.run(cfg)
    ckpt = Checkpointer(cfg.train.run_dir, cfg.checkpoint)
    assert ckpt.all_steps() == [4, 8, 10, 12]  # multiples of 4, and the last 2
    ckpt.close()
    # The resolved config travels inside each checkpoint too.
    saved = json.loads((tmp_path / "run" / "checkpoints" / "8" / "config" / "metadata").read_text())
    assert saved["model"]["d_model"] == 64 and saved["checkpoint"]["keep_every"] == 4
