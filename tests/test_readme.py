"""Every command in README.md's shell blocks runs as written, so the README cannot go stale.

Each ```bash block is read from the README itself, split into commands and run in a fresh
working directory (the repository's configs, launch scripts and benchmarks linked in) with
`flaxlm` and `python` on PATH as this interpreter. Only scale changes: commands that would take
minutes get overrides appended from `TINY` (fewer steps, shorter rows) or a smaller ladder
composed from the README's own (`LADDERS`); launchers for hardware this machine lacks (TPU
pods, SLURM) run with `--dry-run`; `pip install` lines are checked against pyproject's extras
and the test command against .ci/run instead of run. What the commands read is made locally: a
small random GPT-2 at ./gpt2, text under corpus/ and my/, and lm1b through TFDS's own mock
(`tfds.testing.mock_data`), since nothing may download and tf.data cannot read the emulated
gs:// bucket.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO, xla_flags

README = (REPO / "README.md").read_text()
TRAIN = [
    "train.steps=3", "train.log_every=1", "train.eval_every=3", "data.eval_batches=1",
    "checkpoint.every_steps=3", "train.sample_new_tokens=8", "train.progress_bar=false",
]  # fmt: skip
# Appended to a command that starts with the key: the same command at a scale of seconds.
TINY = {
    "flaxlm train": TRAIN,
    "launch/local.sh": TRAIN,
    "launch/tpu_pod.sh": ["--dry-run"],
    "launch/multislice.sh": ["--dry-run"],
    "launch/slurm.sh": ["--dry-run"],
    "flaxlm bench": ["--steps", "1", "--warmup", "0"],
    "flaxlm sweep": ["--steps", "1", "--warmup", "0"],
    "flaxlm tokenizer train": ["--max-bytes", "3000000"],
    "flaxlm compile": ["model.n_layers=2", "data.seq_len=2048"],
    "flaxlm plan": ["model.n_layers=2", "data.seq_len=2048", "--compile", "1", "--jobs", "1",
                    "--remat", "full"],
    "flaxlm generate": [],
    "flaxlm fill-mask": [],
    "flaxlm convert": [],
    "flaxlm scaling": [],  # its ladder is replaced by a smaller one (LADDERS)
    "flaxlm data build-tfds": [],
    "flaxlm data tokenize": [],
    "python benchmarks/vs_pytorch.py": ["--steps", "1", "--warmup", "1", "--repeats", "1",
                                        "--curve-steps", "2", "--no-compile",
                                        "--set", "data.seq_len=64", "data.global_batch_size=4"],
}  # fmt: skip
# The README's ladder with fewer budgets and models (a ladder composes another by defaults).
LADDERS = {"configs/scaling/tiny-ladder.yaml": "small-ladder.yaml"}
SMALL_LADDER = """\
defaults: [configs/scaling/tiny-ladder.yaml]
budgets: [1.0e10, 2.0e10, 4.0e10]
models:
  - name: d16-l2
    overrides: [model.d_model=16, model.n_heads=2, model.d_ff=64, model.n_layers=2]
  - name: d32-l2
    overrides: [model.d_model=32, model.n_heads=2, model.d_ff=128, model.n_layers=2]
"""


def bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", README, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, `&&` split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [
        c.strip() for line in lines if line and not line.startswith("#") for c in line.split("&&")
    ]


def _tiny(command: str) -> str:
    for ladder, small in LADDERS.items():
        command = command.replace(f"--config {ladder}", f"--config {small}")
    words = command.split()
    program = " ".join(w for w in words if "=" not in w or w.startswith("-"))  # skips VAR=...
    for prefix, extra in TINY.items():
        if program.startswith(prefix):
            return command + "".join(f" {shlex.quote(e)}" for e in extra)
    raise AssertionError(f"README command with no rule in tests/test_readme.py: {command}")


@pytest.fixture
def workspace(tmp_path, corpus_cache):
    """A user's directory: the repository's files at hand, the inputs the commands name."""
    transformers = pytest.importorskip("transformers")
    for name in ("configs", "launch", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "flaxlm").write_text(f'#!/bin/sh\nexec {sys.executable} -m flaxlm.cli "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    hf = transformers.GPT2Config(vocab_size=320, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(hf).save_pretrained(tmp_path / "gpt2")
    for d, n in [("my", 3), ("my_eval", 1), ("corpus/train", 3), ("corpus/eval", 1)]:
        (tmp_path / d).mkdir(parents=True)
        for i in range(n):
            text = f"Document {i} of {d}: " + "the quick brown fox jumps over the lazy dog. " * 40
            (tmp_path / d / f"{i}.txt").write_text(text)
            (tmp_path / d / f"{i}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "small-ladder.yaml").write_text(SMALL_LADDER)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "flaxlm").symlink_to(corpus_cache)  # the built python-docs corpus
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),  # ~/tensorflow_datasets lands here
        "XLA_FLAGS": xla_flags(8),
        "JAX_PLATFORMS": "cpu",
    }
    return tmp_path, env


def _run(command: str, cwd, env) -> subprocess.CompletedProcess:
    if "data.tfds_name=lm1b" in command:
        # lm1b cannot be prepared here: TFDS's mock serves it, from a local data dir.
        command = command.replace("gs://my-bucket/tensorflow_datasets", str(cwd / "tfds"))
        mock = "import sys, tensorflow_datasets as tfds; from flaxlm.cli import entry\n"
        mock += "with tfds.testing.mock_data(num_examples=64): sys.exit(entry())"
        command = command.replace("flaxlm ", f"python -c {shlex.quote(mock)} ", 1)
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_the_readme_has_the_blocks_this_test_runs():
    blocks = bash_blocks()
    assert len(blocks) >= 7
    assert sum(len(commands(b)) for b in blocks) >= 20


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(bash_blocks())))
def test_readme_block(index, workspace):
    cwd, env = workspace
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    ci = (REPO / ".ci" / "run").read_text()
    if "runs/gpt2/config.yaml" in bash_blocks()[index]:  # continues the import block's run
        assert _run("flaxlm convert from-hf ./gpt2 runs/gpt2", cwd, env).returncode == 0
    for command in commands(bash_blocks()[index]):
        if command.startswith("pip install"):
            for extra in re.findall(r"\[(\w+)\]", command):
                assert extra in extras, f"README installs the missing extra [{extra}]"
            continue
        if command.startswith(("ruff", "python -m pytest")):
            assert command in ci, f".ci/run does not run the README's `{command}`"
            continue
        proc = _run(_tiny(command), cwd, env)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr, f"{command}\n{proc.stderr[-4000:]}"
        if command.startswith("flaxlm generate"):
            assert proc.stdout.startswith("Once upon a time")


def yaml_blocks() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_config_snippets_are_valid_configs(tmp_path):
    from omegaconf import OmegaConf

    from flaxlm import config

    quickstart, *snippets = yaml_blocks()
    # The quickstart shown is the file shipped.
    assert OmegaConf.create(quickstart) == OmegaConf.load(REPO / "configs" / "quickstart.yaml")
    assert len(snippets) >= 3
    for i, snippet in enumerate(snippets):
        path = tmp_path / f"snippet{i}.yaml"
        # Rope settings go on a rope model (a Llama); the others on the quickstart.
        base = "models/llama-tiny.yaml" if "rope_" in snippet else "quickstart.yaml"
        path.write_text(
            f"defaults: [{REPO / 'configs' / 'base.yaml'}, {REPO / 'configs' / base}]\n{snippet}"
        )
        cfg = config.load(path)  # type-checked and validated, or ConfigError names the key
        for key, value in _leaves(OmegaConf.to_container(OmegaConf.create(snippet))):
            assert OmegaConf.select(OmegaConf.structured(cfg), key) == value, key


def _leaves(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix.rstrip('.')}[{i}].")
    else:
        yield prefix.rstrip("."), tree
