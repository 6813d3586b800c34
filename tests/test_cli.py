"""The command line end to end: train, eval, generate, and the errors users see."""

from __future__ import annotations

import json

import pytest
from conftest import CONFIGS
from helpers import flaxlm, train_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_cache):
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = train_tiny(run, corpus_cache, "train.steps=20", "mesh.data=2", "mesh.fsdp=4")
    return run, proc


def test_train_writes_the_run_directory(trained_run):
    run, proc = trained_run
    assert (run / "config.yaml").is_file()
    assert any((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
        assert all(isinstance(r[key], float) for r in train_records), key
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learned something
    # The summary on stdout: bits per byte before and after, then the sample.
    assert "bits per byte" in proc.stdout and "Once upon a time" in proc.stdout


def test_eval_prints_one_json_line(trained_run, corpus_cache):
    run, _ = trained_run
    proc = flaxlm("eval", "--checkpoint", str(run), f"data.cache_dir={corpus_cache}", devices=4)
    result = json.loads(proc.stdout.strip())
    assert result["step"] == 20
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    assert 0 < result["bits_per_byte"] < 9 and result["tokens"] > 0
    # The same eval set and parameters as the training run's final eval, on another mesh.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("step") == 20 and "eval_loss" in r][-1]
    assert result["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_eval_of_an_earlier_step_and_a_missing_step(trained_run, corpus_cache):
    run, _ = trained_run
    proc = flaxlm(
        "eval", "--checkpoint", str(run), "--step", "10", f"data.cache_dir={corpus_cache}"
    )
    assert json.loads(proc.stdout)["step"] == 10
    missing = flaxlm("eval", "--checkpoint", str(run), "--step", "7", check=False)
    assert missing.returncode == 2 and "no checkpoint at step 7" in missing.stderr


def test_generate_greedy_is_deterministic_and_keeps_the_prompt(trained_run):
    run, _ = trained_run
    args = ("generate", "--checkpoint", str(run), "--prompt", "The list", "--max-new-tokens", "20")
    first, second = flaxlm(*args), flaxlm(*args, devices=1)
    assert first.stdout.startswith("The list")
    assert first.stdout == second.stdout  # greedy, and independent of the device count


def test_bad_inputs_exit_2_with_a_message(tmp_path):
    typo = flaxlm("train", "--config", str(CONFIGS / "tiny.yaml"), "model.n_layer=2", check=False)
    assert typo.returncode == 2 and "model.n_layer" in typo.stderr
    assert "Traceback" not in typo.stderr
    mesh = flaxlm(
        "train", "--config", str(CONFIGS / "tiny.yaml"), "mesh.data=3", "mesh.fsdp=1", check=False
    )
    assert mesh.returncode == 2 and "mesh.data=3" in mesh.stderr
    not_a_run = flaxlm("eval", "--checkpoint", str(tmp_path), check=False)
    assert not_a_run.returncode == 2 and "no config.yaml" in not_a_run.stderr


def test_params_only_export_evaluates_the_same_and_is_smaller(trained_run, corpus_cache, tmp_path):
    run, _ = trained_run
    export = tmp_path / "export"
    flaxlm("export", "--checkpoint", str(run), str(export), devices=4)
    cache = f"data.cache_dir={corpus_cache}"
    original = json.loads(flaxlm("eval", "--checkpoint", str(run), cache, devices=4).stdout)
    exported = json.loads(flaxlm("eval", "--checkpoint", str(export), cache, devices=4).stdout)
    assert exported == original  # same step, same loss, bit for bit

    def size(path):
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    # AdamW keeps two moments per parameter: the export holds about a third of the state.
    assert size(export / "checkpoints") < 0.5 * size(run / "checkpoints" / "20" / "state")
    refused = flaxlm("train", "--config", str(export / "config.yaml"), f"train.run_dir={export}",
                     check=False)  # fmt: skip
    assert refused.returncode == 2 and "parameters-only export" in refused.stderr


def test_generate_batches_prompts_and_cuts_at_a_stop_string(trained_run):
    run, _ = trained_run
    single = flaxlm(
        "generate", "--checkpoint", str(run), "--prompt", "The", "--max-new-tokens", "12"
    )
    both = flaxlm(
        "generate", "--checkpoint", str(run), "--prompt", "The", "--prompt", "A longer prompt",
        "--max-new-tokens", "12",
    )  # fmt: skip
    first, second = both.stdout.rstrip("\n").split("\n\n", 1)
    assert first == single.stdout.rstrip("\n")  # batching with a longer prompt changes nothing
    assert second.startswith("A longer prompt")
    continuation = single.stdout.rstrip("\n")[len("The") :]
    stop = continuation[3:5]
    cut = flaxlm(
        "generate", "--checkpoint", str(run), "--prompt", "The", "--max-new-tokens", "12",
        "--stop", stop,
    )  # fmt: skip
    text = cut.stdout.rstrip("\n")
    assert text.endswith(stop) and len(text) <= len(single.stdout.rstrip("\n"))
    assert stop not in text[len("The") : -len(stop)]


def test_eval_of_every_checkpoint_writes_a_table_and_a_plot(trained_run, corpus_cache):
    import csv

    run, _ = trained_run
    proc = flaxlm("eval", "--checkpoint", str(run), "--all-steps", f"data.cache_dir={corpus_cache}")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["step"] for r in lines] == [10, 20]
    with open(run / "eval" / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [10, 20]
    assert float(rows[1]["loss"]) == pytest.approx(lines[1]["loss"])
    # The same numbers as the training run's own evaluations at those steps.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    during = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert [r["loss"] for r in lines] == pytest.approx([during[10], during[20]], rel=1e-5)
    assert (run / "eval" / "eval_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_picks_a_mesh_that_fits_the_devices_at_hand(trained_run, corpus_cache):
    run, _ = trained_run
    # 6 devices do not divide the batch of 8: eval shards over 2 of them instead of failing.
    six = flaxlm("eval", "--checkpoint", str(run), f"data.cache_dir={corpus_cache}", devices=6)
    eight = flaxlm("eval", "--checkpoint", str(run), f"data.cache_dir={corpus_cache}", devices=8)
    assert json.loads(six.stdout)["loss"] == pytest.approx(
        json.loads(eight.stdout)["loss"], rel=1e-6
    )
