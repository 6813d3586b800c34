"""lm-eval tasks inside the training loop (`train.eval_tasks`): scored on the parameters in
memory at the configured steps, equal to the standalone adapter on the saved checkpoints, and
an unknown task refused before training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import CONFIGS, REPO  # noqa: E402

from flaxlm import config  # noqa: E402
from flaxlm.config import ConfigError  # noqa: E402

ROWS = [
    {"question": "1 + 1 =", "choices": [" 2", " 3"], "answer": 0, "text": "def f(x): return x"},
    {"question": "Lists are", "choices": [" mutable", " frozen"], "answer": 0, "text": "import os"},
    {"question": "True is not", "choices": [" false", " true"], "answer": 1, "text": "x = [1, 2]"},
]


def _write_tasks(directory):
    """Two local tasks on one JSON file: multiple choice (acc) and rolling log-likelihood
    (bits_per_byte, a continuous score: a strict comparison)."""
    directory.mkdir()
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    )
    (directory / "choice.yaml").write_text(
        f"task: tiny_choice\n{common}output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    (directory / "rolling.yaml").write_text(
        f"task: tiny_rolling\n{common}output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n"
    )
    return directory


@pytest.mark.slow
def test_task_scores_at_the_configured_steps_equal_the_checkpoints(tiny_cfg, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from flaxlm import loop
    from flaxlm.eval_tasks import TaskSet, evaluate_tasks
    from flaxlm.harness import FlaxLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _write_tasks(tmp_path / "tasks")
    cfg = tiny_cfg(
        "train.steps=4", "train.eval_every=0", "checkpoint.every_steps=2",
        f"train.eval_tasks=[{tasks}]", "train.eval_tasks_every=2", "train.eval_tasks_limit=2",
        "train.sample_prompt=",
    )  # fmt: skip
    loop.run(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if any(k.startswith("eval_task/") for k in r)}
    assert sorted(scored) == [2, 4]
    assert (
        scored[2]["eval_task/tiny_rolling/bits_per_byte"]
        != (scored[4]["eval_task/tiny_rolling/bits_per_byte"])
    )
    # The oracle: the standalone adapter on each saved checkpoint, on the same examples.
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    task_set = TaskSet(["tiny_choice", "tiny_rolling"], manager)
    for step in (2, 4):
        lm = FlaxLM(checkpoint=str(tmp_path / "run"), step=step)
        expected = evaluate_tasks(lm, task_set, limit=2)
        assert set(expected) <= set(scored[step])
        for key, value in expected.items():
            assert scored[step][key] == pytest.approx(value, rel=1e-6), key


def test_unknown_task_is_refused_before_training(tiny_cfg, tmp_path):
    from flaxlm import loop

    tasks = _write_tasks(tmp_path / "tasks")
    cfg = tiny_cfg(f"train.eval_tasks=[{tasks / 'choice.yaml'},no_such_task_xyz]")
    with pytest.raises(ConfigError, match=r"no_such_task_xyz.*local task YAML"):
        loop.run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_task_file_exits_with_status_2(tmp_path):
    missing = tmp_path / "nowhere" / "task.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "flaxlm.cli", "train", "--config", str(CONFIGS / "tiny.yaml"),
         f"train.run_dir={tmp_path / 'run'}", f"train.eval_tasks=[{missing}]"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in proc.stderr and "local task YAML" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_tasks_schedule_is_validated():
    with pytest.raises(ConfigError, match=r"train\.eval_tasks_every=-1"):
        config.load(CONFIGS / "tiny.yaml", ["train.eval_tasks_every=-1"])
    with pytest.raises(ConfigError, match=r"train\.eval_tasks_limit=0"):
        config.load(CONFIGS / "tiny.yaml", ["train.eval_tasks_limit=0"])


def test_scores_keep_numbers_and_name_filters():
    from flaxlm.eval_tasks import scores

    got = scores(
        {"t": {"alias": "t", "sample_len": 3, "acc,none": 0.5, "acc_stderr,none": "N/A", "em,s": 1}}
    )
    assert got == {"eval_task/t/acc": 0.5, "eval_task/t/em/s": 1.0}


@pytest.mark.slow
def test_two_processes_score_the_tasks_together_and_log_them_once(
    tmp_path, corpus_cache, monkeypatch
):
    """Every process of a multi-host job takes part in the tasks' forward passes (the
    parameters are sharded across both); the scores are logged once and equal the standalone
    adapter's on the saved checkpoint."""
    from helpers import flaxlm_processes
    from lm_eval.tasks import TaskManager

    from flaxlm.eval_tasks import TaskSet, evaluate_tasks
    from flaxlm.harness import FlaxLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _write_tasks(tmp_path / "tasks")
    run = tmp_path / "run"
    flaxlm_processes(
        2, 4, "train", "--config", str(CONFIGS / "tiny.yaml"),
        f"data.cache_dir={corpus_cache}", f"train.run_dir={run}", "train.steps=2",
        "train.eval_every=0", "checkpoint.every_steps=2", "train.progress_bar=false",
        "train.tensorboard=false", "train.sample_prompt=", f"train.eval_tasks=[{tasks}]",
        "train.eval_tasks_every=2", "train.eval_tasks_limit=2",
    )  # fmt: skip
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if any(k.startswith("eval_task/") for k in r)]
    assert [r["step"] for r in scored] == [2]  # one record, from process 0
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    expected = evaluate_tasks(
        FlaxLM(checkpoint=str(run), step=2), TaskSet(["tiny_choice", "tiny_rolling"], manager), 2
    )
    for key, value in expected.items():
        assert scored[0][key] == pytest.approx(value, rel=1e-5), key
