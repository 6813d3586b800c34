"""Trackers: a timestamp on every metrics.jsonl record, TensorBoard scalars grouped by kind, and
Weights & Biases (offline) as an optional logger that a restarted run keeps logging into."""

from __future__ import annotations

import json
import time

import pytest

from flaxlm.config import WandbConfig, WandbMode
from flaxlm.metrics import MetricsWriter, scalar_name

RECORDS = [
    (1, {"loss": 3.5, "learning_rate": 1e-3, "tokens_per_second": 1e4, "mfu": 0.4}),
    (2, {"eval_loss": 3.2, "eval_bits_per_byte": 4.6, "eval_loss/code": 2.9}),
    (2, {"checkpoint_blocking_seconds": 0.5, "loss": 3.4}),
]


def test_scalars_are_grouped_by_kind():
    assert scalar_name("loss") == "train/loss"
    assert scalar_name("grad_norm") == "train/grad_norm"
    assert scalar_name("eval_loss") == "eval/loss"
    assert scalar_name("eval_bits_per_byte/code") == "eval/bits_per_byte/code"
    assert scalar_name("mfu") == "perf/mfu"
    assert scalar_name("checkpoint_blocking_seconds") == "perf/checkpoint_blocking_seconds"


def test_records_carry_timestamps_and_tensorboard_tags_are_grouped(tmp_path):
    import tensorflow as tf

    before = time.time()
    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step, record in RECORDS:
        writer.write(step, record)
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2]
    assert all(before <= r["timestamp"] <= time.time() for r in lines)
    assert lines[1]["eval_loss"] == 3.2  # metrics.jsonl keeps the flat names
    tags = set()
    for path in (tmp_path / "tensorboard").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags |= {value.tag for value in event.summary.value}
    assert {"train/loss", "perf/mfu", "eval/loss", "eval/loss/code"} <= tags
    assert "perf/checkpoint_blocking_seconds" in tags and "loss" not in tags


def test_wandb_offline_logs_the_scalars_and_a_restart_resumes_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    cfg = WandbConfig(project="flaxlm-test", mode=WandbMode.offline)
    ids = []
    for attempt in range(2):
        writer = MetricsWriter(tmp_path, tensorboard=False, wandb=cfg, config={"attempt": attempt})
        for step, record in RECORDS:
            writer.write(step + 10 * attempt, record)
        writer.close()
        ids.append((tmp_path / "wandb_id").read_text().strip())
    run_id = ids[0]
    assert ids == [run_id, run_id]  # the restart logs into the same W&B run
    # One directory per attempt (named by the second it started, so two may share one).
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and len(list((tmp_path / "wandb").glob("offline-run-*"))) == len(runs)
    logged = (runs[-1] / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in logged and b"eval/bits_per_byte" in logged and b"perf/mfu" in logged
