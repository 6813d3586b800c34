"""Resuming a run with another config: the schedule keeps its horizon, changes that cannot
resume are refused before anything is touched, a finished run stays finished."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import CONFIGS

from flaxlm import config, loop, optim, resume
from flaxlm.config import ConfigError

pytestmark = pytest.mark.slow

PEAK, FLOOR = 1e-3, 1e-4  # tiny.yaml's learning rate, x min_lr_ratio 0.1


def _overrides(run_dir: Path, corpus_cache: str, *more: str) -> list[str]:
    return [
        f"train.run_dir={run_dir}", f"data.cache_dir={corpus_cache}", "train.progress_bar=false",
        "train.tensorboard=false", "train.sample_prompt=", "train.log_every=1",
        "train.eval_every=0", "train.steps=4", "checkpoint.every_steps=2",
        "optimizer.warmup_steps=1", "data.eval_batches=1", *more,
    ]  # fmt: skip


def _load(run_dir: Path, corpus_cache: str, *more: str):
    return config.load(CONFIGS / "tiny.yaml", _overrides(run_dir, corpus_cache, *more))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    loop.run(_load(run_dir, corpus_cache))
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _learning_rates(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["learning_rate"] for r in records if "learning_rate" in r}


def test_the_horizon_is_saved_with_the_run(finished_run):
    saved = config.load(finished_run / "config.yaml")
    assert saved.optimizer.decay_steps == 4


def test_a_schedule_past_its_horizon_stays_at_its_floor(tiny_cfg):
    cfg = tiny_cfg("optimizer.warmup_steps=1", "optimizer.decay_steps=4").optimizer
    schedule = optim.learning_rate_schedule(cfg, 6)
    assert float(schedule(4)) == pytest.approx(FLOOR)
    assert float(schedule(5)) == pytest.approx(FLOOR)
    stretched = optim.learning_rate_schedule(dataclasses.replace(cfg, decay_steps=None), 6)
    assert float(stretched(4)) > FLOOR * 1.5


def test_raising_train_steps_keeps_the_schedule_and_says_so(run_copy, corpus_cache, capsys):
    before = _learning_rates(run_copy)
    summary = loop.run(_load(run_copy, corpus_cache, "train.steps=6"))
    assert (summary.start_step, summary.end_step) == (4, 6)
    after = _learning_rates(run_copy)
    assert {s: after[s] for s in before} == before
    # Past the saved horizon the rate stays at the floor: not re-stretched to the new length.
    assert after[5] == pytest.approx(FLOOR) and after[6] == pytest.approx(FLOOR)
    err = capsys.readouterr().err
    assert "keeps its horizon, optimizer.decay_steps=4" in err
    assert "train.steps: 4 -> 6" in err
    assert config.load(run_copy / "config.yaml").optimizer.decay_steps == 4


def test_changing_the_horizon_explicitly_is_listed(run_copy, corpus_cache):
    messages: list[str] = []
    cfg = _load(run_copy, corpus_cache, "train.steps=6", "optimizer.decay_steps=6")
    plan = resume.plan(run_copy, cfg, messages.append)
    assert plan.cfg.optimizer.decay_steps == 6 and plan.complete is None
    assert "optimizer.decay_steps: 4 -> 6" in messages[0]
    assert not any("keeps its horizon" in m for m in messages)


@pytest.mark.parametrize(
    "change, named",
    [
        ("data.global_batch_size=16", "data.global_batch_size: 8 -> 16"),
        ("data.seq_len=32", "data.seq_len: 64 -> 32"),
        ("model.n_layers=3", "model.n_layers: 2 -> 3"),
        ("optimizer.name=lion", "optimizer.name: 'adamw' -> 'lion'"),
        ("optimizer.grad_clip_norm=0", "optimizer.grad_clip_norm: 1.0 -> 0.0"),
        ("data.tokenizer=sentencepiece", "data.tokenizer: 'byte' -> 'sentencepiece'"),
    ],
)
def test_a_change_that_cannot_resume_is_refused_and_touches_nothing(
    run_copy, corpus_cache, change, named
):
    before = _snapshot(run_copy)
    extra = ["data.tokenizer_path=/nonexistent.model"] if "tokenizer" in change else []
    with pytest.raises(ConfigError) as e:
        loop.run(_load(run_copy, corpus_cache, "train.steps=6", change, *extra))
    assert named in str(e.value)
    assert "new train.run_dir" in str(e.value)
    assert _snapshot(run_copy) == before


def test_train_steps_below_the_checkpoint_is_refused(run_copy, corpus_cache):
    before = _snapshot(run_copy)
    with pytest.raises(ConfigError, match=r"train.steps=2 is below the newest checkpoint .*step 4"):
        loop.run(_load(run_copy, corpus_cache, "train.steps=2"))
    assert _snapshot(run_copy) == before


def test_a_finished_run_run_again_changes_nothing(run_copy, corpus_cache, capsys):
    before = _snapshot(run_copy)
    summary = loop.run(_load(run_copy, corpus_cache, "optimizer.learning_rate=0.5"))
    assert (summary.start_step, summary.end_step) == (4, 4)
    assert summary.final_eval == json.loads(before["summary.json"])["final_eval"]
    assert "already complete at step 4" in capsys.readouterr().err
    assert _snapshot(run_copy) == before
