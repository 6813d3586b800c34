"""Bad inputs from the command line: each one exits 2 with a message naming the problem and
no traceback, or works. The run directories here are written from an initialised state (no
training); the commands run in this process through `flaxlm.cli.main` (the exit status and
stderr are what a user sees), except where a background thread's output is at stake."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS
from helpers import flaxlm

pytestmark = pytest.mark.slow

TINY = str(CONFIGS / "tiny.yaml")


@dataclasses.dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capfd):
    """Runs `flaxlm ARGS` in this process; returns its status and output."""
    from flaxlm.cli import main

    def run(*args: str, check: bool = True, devices: int = 1) -> Ran:
        capfd.readouterr()
        status = main(list(args))
        out, err = capfd.readouterr()
        if check and status != 0:
            raise AssertionError(f"flaxlm {args} exited {status}:\n{err[-3000:]}")
        return Ran(status, out, err)

    return run


def _refused(proc, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "never awaited" not in proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_cache) -> Path:
    """A run directory with checkpoints at steps 1 and 2 of an initialised tiny model."""
    import jax

    from flaxlm import config
    from flaxlm.checkpoint import Checkpointer
    from flaxlm.data.tokenizer import ByteTokenizer
    from flaxlm.mesh import make_mesh
    from flaxlm.run_dir import write_run_files
    from flaxlm.train import Trainer

    run = tmp_path_factory.mktemp("bad-inputs") / "run"
    cfg = config.load(
        TINY, [f"train.run_dir={run}", f"data.cache_dir={corpus_cache}", "data.eval_batches=1"]
    )
    trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
    write_run_files(run, cfg, ByteTokenizer())
    state = trainer.init_state(0)
    checkpointer = Checkpointer(run, cfg.checkpoint)
    for step in (1, 2):
        checkpointer.save(step, state, None, cfg)
    checkpointer.wait()
    checkpointer.close()
    return run


@pytest.fixture
def files(tmp_path) -> Path:
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50)))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café crème brûlée"}\n'.encode("latin-1"))
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bad.model").write_bytes(np.random.default_rng(0).bytes(300))
    hf = tmp_path / "hf-tok"
    hf.mkdir()
    (hf / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vo')
    return tmp_path


@pytest.mark.parametrize(
    "name, phrase",
    [("list.yaml", "holds a list at its top level"), ("empty.yaml", "is empty")],
)
def test_a_config_file_that_is_not_a_mapping(cli, files, name, phrase):
    _refused(cli("train", "--config", str(files / name), check=False), phrase)


def test_a_corrupt_sentencepiece_model(cli, files, tmp_path):
    proc = cli(
        "train", "--config", TINY, f"train.run_dir={tmp_path / 'r'}",
        "data.tokenizer=sentencepiece", f"data.tokenizer_path={files / 'bad.model'}",
        check=False, devices=1,
    )  # fmt: skip
    _refused(proc, "cannot read the SentencePiece model", "bad.model")
    assert not (tmp_path / "r").exists()


def test_a_truncated_tokenizer_json(cli, files, tmp_path):
    proc = cli(
        "train", "--config", TINY, f"train.run_dir={tmp_path / 'r'}",
        "data.tokenizer=hf", f"data.tokenizer_path={files / 'hf-tok'}", check=False, devices=1,
    )  # fmt: skip
    _refused(proc, "cannot read the Hugging Face tokenizer", "truncated or corrupt")


def test_a_latin1_jsonl_file_is_named_and_no_background_traceback_follows(files, tmp_path):
    proc = flaxlm(
        "train", "--config", TINY, f"train.run_dir={tmp_path / 'r'}", "data.corpus=files",
        f"data.train_files={files / 'latin1.jsonl'}", f"data.eval_files={files / 'good.jsonl'}",
        "train.progress_bar=false", check=False, devices=1,
    )  # fmt: skip
    _refused(proc, "latin1.jsonl is not UTF-8", "iconv")
    assert "Exception in thread" not in proc.stderr


@pytest.mark.parametrize(
    "args, phrase",
    [
        (("--prompt", "x" * 80), "the model's context (model.max_seq_len) is 64"),
        (("--prompt", "Hi", "--max-new-tokens", "100"), "--max-new-tokens=100 after a"),
        (("--prompt", "Hi", "--max-new-tokens", "-5"), "--max-new-tokens=-5 must be >= 0"),
    ],
)
def test_generate_refuses_what_does_not_fit_the_context(cli, run_dir, args, phrase):
    proc = cli("generate", "--checkpoint", str(run_dir), *args, check=False, devices=1)
    _refused(proc, phrase)


def test_eval_on_files_needs_only_eval_files(cli, run_dir, files):
    proc = cli(
        "eval", "--checkpoint", str(run_dir), "data.corpus=files",
        f"data.eval_files={files / 'good.jsonl'}", devices=1,
    )  # fmt: skip
    assert json.loads(proc.stdout.splitlines()[-1])["step"] == 2


def test_eval_falls_back_past_a_truncated_checkpoint(cli, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for f in (run / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:40])  # truncated array data
    proc = cli("eval", "--checkpoint", str(run), devices=1)
    assert json.loads(proc.stdout.splitlines()[-1])["step"] == 1
    assert "checkpoint 2" in proc.stderr and "using step 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_after_config_yaml_was_edited_to_another_model(cli, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("n_layers: 2", "n_layers: 3"))
    proc = cli("eval", "--checkpoint", str(run), check=False, devices=1)
    _refused(proc, "describes another model than its checkpoint 2", "model.n_layers: 2 -> 3")


def test_eval_of_a_missing_step_and_a_directory_without_a_run(cli, run_dir, tmp_path):
    _refused(
        cli("eval", "--checkpoint", str(run_dir), "--step", "7", check=False, devices=1),
        "no checkpoint at step 7",
    )
    _refused(
        cli("generate", "--checkpoint", str(tmp_path), "--prompt", "a", check=False, devices=1),
        "not a flaxlm run directory",
    )


def test_strict_json_has_no_infinity():
    from flaxlm.report import strict_json
    from flaxlm.scaling import fit_power_law

    fit = fit_power_law([1e12, 1e13, 1e14], [4.0, 3.5, 3.2])  # 3 points: no error estimate
    line = strict_json({"fit": fit, "loss": float("nan"), "rows": [float("inf")]})
    assert "Infinity" not in line and "NaN" not in line
    parsed = json.loads(line)
    assert parsed["loss"] is None and parsed["rows"] == [None]


GPT2_CONFIG = {
    "model_type": "gpt2", "vocab_size": 320, "n_embd": 32, "n_layer": 2, "n_head": 2,
    "n_positions": 32,
}  # fmt: skip


def _hf_dir(path: Path, config: dict | str, tensors: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    from flaxlm.config import ModelConfig
    from flaxlm.convert.hf_config import model_overrides_from_hf
    from flaxlm.convert.params import hf_shapes

    path.mkdir(parents=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (path / "config.json").write_text(text)
    if tensors is None:
        shapes = hf_shapes(ModelConfig(**model_overrides_from_hf(GPT2_CONFIG)))
        tensors = {f"transformer.{k}": np.zeros(s, np.float32) for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _full() -> dict[str, np.ndarray]:
    from flaxlm.config import ModelConfig
    from flaxlm.convert.hf_config import model_overrides_from_hf
    from flaxlm.convert.params import hf_shapes

    shapes = hf_shapes(ModelConfig(**model_overrides_from_hf(GPT2_CONFIG)))
    return {f"transformer.{k}": np.zeros(s, np.float32) for k, s in shapes.items()}


def _without(name: str) -> dict:
    tensors = _full()
    del tensors[f"transformer.{name}"]
    return tensors


def _wider() -> dict:
    tensors = _full()
    tensors["transformer.h.1.attn.c_attn.weight"] = np.zeros((48, 144), np.float32)
    return tensors


@pytest.mark.parametrize(
    "config, tensors, phrase",
    [
        ('{"model_type": "gpt2", "n_embd": ', None, "is not valid JSON"),
        ("[1, 2]", None, "not a JSON object"),
        ({k: v for k, v in GPT2_CONFIG.items() if k != "n_layer"}, None, "has no 'n_layer'"),
        (GPT2_CONFIG, "garbage", "is truncated or not safetensors"),
        (GPT2_CONFIG, _without("h.1.mlp.c_fc.bias"), "no tensor 'h.1.mlp.c_fc.bias'"),
        (GPT2_CONFIG, _wider(), "'h.1.attn.c_attn.weight' has shape (48, 144)"),
    ],
)
def test_convert_from_hf_names_what_is_wrong(tmp_path, config, tensors, phrase):
    from flaxlm import convert
    from flaxlm.config import ConfigError

    src = tmp_path / "hf"
    if isinstance(tensors, str):
        _hf_dir(src, config)
        (src / "model.safetensors").write_bytes(b"\x10\x00garbage")
    else:
        _hf_dir(src, config, tensors)
    with pytest.raises(ConfigError, match=None) as e:
        convert.from_hf(src, tmp_path / "run")
    assert phrase in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
