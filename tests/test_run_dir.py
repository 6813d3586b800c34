"""Run-directory paths: `~` and environment variables, relative paths, a run dir that is a file
or cannot be written, and self-contained outputs (exports and `to-hf` carry their tokenizer)."""

from __future__ import annotations

import os

import pytest
from conftest import CONFIGS
from helpers import flaxlm

from flaxlm import config, fs
from flaxlm.config import ConfigError
from flaxlm.run_dir import check_writable


def test_home_and_environment_variables_are_expanded_in_every_path_key(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAXLM_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = config.load(
        None,
        [
            "train.run_dir=~/runs/r1", "data.tfds_data_dir=~/tensorflow_datasets",
            "data.train_files=$FLAXLM_DATA/*.txt", "data.eval_files=$FLAXLM_DATA/e/*.txt",
            "data.cache_dir=~/cache", "train.init_from=$FLAXLM_DATA/base",
        ],
    )  # fmt: skip
    assert cfg.train.run_dir == "/home/someone/runs/r1"
    assert cfg.data.tfds_data_dir == "/home/someone/tensorflow_datasets"
    assert cfg.data.train_files == f"{tmp_path}/*.txt"
    assert cfg.data.eval_files == f"{tmp_path}/e/*.txt"
    assert cfg.data.cache_dir == "/home/someone/cache"
    assert cfg.train.init_from == f"{tmp_path}/base"
    # Command-line paths go through the same expansion; relative ones become absolute.
    assert os.fspath(fs.as_path("~/x")) == "/home/someone/x"
    monkeypatch.chdir(tmp_path)
    assert os.fspath(fs.as_path("runs/a")) == f"{tmp_path}/runs/a"
    assert os.fspath(fs.as_path("gs://$FLAXLM_BUCKET/r")) == "gs://$FLAXLM_BUCKET/r"


def test_a_config_file_path_with_home_is_found(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text(f"defaults: [{CONFIGS / 'tiny.yaml'}]\ntrain:\n  steps: 3\n")
    assert config.load("~/c.yaml").train.steps == 3


def test_a_run_dir_that_is_a_file_or_read_only_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"train.run_dir=.*file is a file, not a directory"):
        check_writable(tmp_path / "file", "train.run_dir")
    with pytest.raises(ConfigError, match=r"cannot write to train.run_dir=.*file/run \("):
        check_writable(tmp_path / "file" / "run", "train.run_dir")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere: use a file system that refuses
        read_only = "/sys/flaxlm-run"
    with pytest.raises(ConfigError, match=r"cannot write to train.run_dir=.* make it writable"):
        check_writable(read_only, "train.run_dir")


def test_train_into_a_file_exits_2_with_a_message(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    proc = flaxlm(
        "train", "--config", str(CONFIGS / "tiny.yaml"), f"train.run_dir={tmp_path / 'run'}",
        devices=1, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run").read_text() == "not a directory"


def test_to_hf_of_a_byte_run_writes_a_tokenizer_that_encodes_like_flaxlm(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_convert import _gpt2

    from flaxlm import convert
    from flaxlm.data.tokenizer import ByteTokenizer

    _, src = _gpt2(tmp_path)  # no tokenizer files: the imported run reads bytes
    convert.from_hf(src, tmp_path / "run")
    assert convert.to_hf(tmp_path / "run", tmp_path / "hf")[0] == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    byte = ByteTokenizer()
    for text in ["hello world", "  tabs\tand\nnewlines ", "é, 日本語, emoji \U0001f600", ""]:
        ids = byte.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.decode(ids) == text
    ids = [byte.bos_id, *byte.encode("ok"), byte.eos_id, 0xE6]  # specials and a cut character
    assert tok.decode(ids, skip_special_tokens=True) == byte.decode(ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
