"""Starting a run from another run's parameters (`train.init_from`), and continued pretraining
of an imported Hugging Face model."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
from test_convert import _bpe_tokenizer, _gpt2

from flaxlm import config, convert, loop
from flaxlm.config import ConfigError
from flaxlm.data.tokenizer import HFTokenizer
from flaxlm.evaluate import evaluate_run
from flaxlm.run_dir import export_params, load_tokenizer

EVAL = ["data.seq_len=32", "data.eval_batches=1", "data.add_bos=false", "data.add_eos=false"]


def _overrides(corpus_cache, *extra):
    return [
        f"data.cache_dir={corpus_cache}", "data.seq_len=32", "data.eval_batches=1",
        "train.steps=2", "train.eval_every=0", "train.progress_bar=false",
        "train.sample_prompt=", "train.tensorboard=false",
        "data.add_bos=false", "data.add_eos=false", *extra,
    ]  # fmt: skip


@pytest.fixture
def imported_gpt2(tmp_path, corpus_cache, monkeypatch):
    """A tiny random GPT-2 with a BPE tokenizer, imported to the relative run dir `gpt2`."""
    _, src = _gpt2(tmp_path)
    _bpe_tokenizer(corpus_cache).save_pretrained(src)
    monkeypatch.chdir(tmp_path)
    convert.from_hf(src, "gpt2")
    return tmp_path / "gpt2"


@pytest.mark.slow
def test_continued_pretraining_of_an_imported_model_and_a_new_run_from_it(
    imported_gpt2, corpus_cache
):
    # Training in the imported run directory through its own config (a relative path).
    cfg = config.load("gpt2/config.yaml", _overrides(corpus_cache, "train.steps=1"))
    assert loop.run(cfg).end_step == 1

    # A new run from those parameters: same loss at step 0 as the source, fresh optimizer.
    source_loss = evaluate_run("gpt2", None, EVAL)["loss"]
    cfg = config.load(
        "gpt2/config.yaml",
        _overrides(corpus_cache, "train.run_dir=cont", "train.init_from=gpt2"),
    )
    summary = loop.run(cfg)
    assert summary.start_step == 0 and summary.end_step == 2
    assert summary.first_eval["loss"] == pytest.approx(source_loss, abs=1e-5)

    # An export is a source too, and a chosen step.
    export_params("gpt2", "export")
    assert load_tokenizer("export").encode("Once upon") == load_tokenizer("gpt2").encode(
        "Once upon"
    )
    assert isinstance(load_tokenizer("export"), HFTokenizer)  # not the byte fallback
    cfg = config.load(
        "gpt2/config.yaml",
        _overrides(corpus_cache, "train.run_dir=cont2", "train.init_from=export",
                   "train.init_from_step=1"),
    )  # fmt: skip
    assert loop.run(cfg).first_eval["loss"] == pytest.approx(source_loss, abs=1e-5)


def test_init_from_another_model_or_a_missing_step_names_the_problem(imported_gpt2, corpus_cache):
    wide = config.load(
        "gpt2/config.yaml",
        _overrides(corpus_cache, "train.run_dir=wide", "train.init_from=gpt2", "model.d_model=64"),
    )
    with pytest.raises(
        ConfigError, match=r"parameter .* has shape .* there but .* in this run.s model config"
    ):
        loop.run(wide)
    missing = config.load(
        "gpt2/config.yaml",
        _overrides(corpus_cache, "train.run_dir=m", "train.init_from=gpt2",
                   "train.init_from_step=7"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.init_from_step=7: .* steps \[0\]"):
        loop.run(missing)
    nowhere = config.load(
        "gpt2/config.yaml", _overrides(corpus_cache, "train.run_dir=n", "train.init_from=nope")
    )
    with pytest.raises(ConfigError, match=r"train\.init_from=nope is not a flaxlm run directory"):
        loop.run(nowhere)
