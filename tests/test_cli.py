"""The command line end to end: train, eval, generate, and the errors users see."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO
from helpers import flaxlm, train_tiny

from flaxlm import __version__, cli

# The end-to-end tests train or load a model; the command-line tests at the end take a second.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_cache):
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = train_tiny(run, corpus_cache, "train.steps=20", "mesh.data=2", "mesh.fsdp=4")
    return run, proc


@slow
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


@slow
def test_the_run_throughput_leaves_out_the_compiling_window(trained_run):
    run, proc = trained_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_seconds"] for r in records if "loss" in r]
    summary = json.loads((run / "summary.json").read_text())
    # The first window (steps 1-5) holds the compilation; the median is of the windows after it.
    assert summary["median_step_seconds"] == pytest.approx(sorted(seconds[1:])[1])
    assert seconds[0] > sorted(seconds[1:])[1]  # compiling is slower than a steady window
    reported = float(proc.stdout.split("throughput: ")[1].split(" tokens/s")[0].replace(",", ""))
    assert reported == pytest.approx(summary["tokens_per_second"], abs=1)


@slow
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


@slow
def test_eval_of_an_earlier_step_and_a_missing_step(trained_run, corpus_cache):
    run, _ = trained_run
    proc = flaxlm(
        "eval", "--checkpoint", str(run), "--step", "10", f"data.cache_dir={corpus_cache}"
    )
    assert json.loads(proc.stdout)["step"] == 10
    missing = flaxlm("eval", "--checkpoint", str(run), "--step", "7", check=False)
    assert missing.returncode == 2 and "no checkpoint at step 7" in missing.stderr


@slow
def test_generate_greedy_is_deterministic_and_keeps_the_prompt(trained_run):
    run, _ = trained_run
    args = ("generate", "--checkpoint", str(run), "--prompt", "The list", "--max-new-tokens", "20")
    first, second = flaxlm(*args), flaxlm(*args, devices=1)
    assert first.stdout.startswith("The list")
    assert first.stdout == second.stdout  # greedy, and independent of the device count


@slow
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


@slow
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


@slow
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


@slow
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


@slow
def test_eval_picks_a_mesh_that_fits_the_devices_at_hand(trained_run, corpus_cache):
    run, _ = trained_run
    # 6 devices do not divide the batch of 8: eval shards over 2 of them instead of failing.
    six = flaxlm("eval", "--checkpoint", str(run), f"data.cache_dir={corpus_cache}", devices=6)
    eight = flaxlm("eval", "--checkpoint", str(run), f"data.cache_dir={corpus_cache}", devices=8)
    assert json.loads(six.stdout)["loss"] == pytest.approx(
        json.loads(eight.stdout)["loss"], rel=1e-6
    )


# Runs flaxlm's main in a fresh interpreter and reports its exit status and which heavy
# libraries it imported.
_CHECK_IMPORTS = """
import sys
from flaxlm.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
heavy = [m for m in ("jax", "tensorflow", "flax", "orbax") if m in sys.modules]
print(f"status={status} heavy={heavy}")
"""


def _main_in_fresh_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _CHECK_IMPORTS, *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip


def test_help_and_version_answer_without_jax_or_tensorflow():
    help_ = _main_in_fresh_process("--help")
    assert "status=0 heavy=[]" in help_.stdout and "flaxlm train" in help_.stdout
    version = _main_in_fresh_process("--version")
    assert "status=0 heavy=[]" in version.stdout and f"flaxlm {__version__}" in version.stdout


@pytest.mark.parametrize(
    "command",
    [["train"], ["bench"], ["compile", "--topology", "v5p:2x2x2"],
     ["tokenizer", "train", "--vocab-size", "300", "--output", "unused"]],
)  # fmt: skip
def test_a_config_typo_exits_2_without_jax_or_tensorflow(command):
    tiny = str(CONFIGS / "tiny.yaml")
    proc = _main_in_fresh_process(*command, "--config", tiny, "model.n_layer=2")
    assert "status=2 heavy=[]" in proc.stdout
    assert "config key 'model.n_layer'" in proc.stderr
    assert "Did you mean one of: 'n_layers'" in proc.stderr and "Traceback" not in proc.stderr


def test_the_command_line_reports_a_config_typo_with_status_2():
    typo = flaxlm("train", "--config", str(CONFIGS / "tiny.yaml"), "model.n_layer=2", check=False)
    assert typo.returncode == 2
    assert typo.stderr.startswith("flaxlm train: error: config key 'model.n_layer'")


def _flags(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield from (flag for flag in action.option_strings if flag.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _flags(sub)


def test_the_usage_text_lists_every_command_and_flag():
    parser = cli.parser()
    usage = parser.format_help()
    flags = set(_flags(parser))
    assert {"--config", "--checkpoint", "--step", "--version", "--top-p"} <= flags
    assert [flag for flag in sorted(flags) if flag not in usage] == []
    for command in cli.COMMANDS:
        assert f"flaxlm {' '.join(command.names)}" in usage


def test_every_error_the_command_line_maps_to_a_status_exists():
    # Error classes are found by module and name (see flaxlm.cli): a move must update the table.
    for module, name, status, _ in cli._OUTCOMES:
        error = getattr(importlib.import_module(module), name)
        assert issubclass(error, Exception) and status in (1, 2, 143)
