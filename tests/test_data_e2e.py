"""End to end: a SentencePiece tokenizer trained by the command line on a locally built TFDS
dataset, then `flaxlm train` and `flaxlm eval` on it (nothing downloads)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import flaxlm, train_tiny


@pytest.mark.slow
def test_train_and_eval_with_sentencepiece_on_a_local_tfds_dataset(tmp_path, corpus_cache):
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "eval").mkdir()
    from flaxlm.data.corpus import build_python_docs

    root = build_python_docs(corpus_cache)
    for split, target in (("train", "train"), ("eval", "eval")):
        for i, path in enumerate(sorted((root / split).glob("*.txt"))[:60]):
            (corpus / target / f"{i}.txt").write_text(path.read_text())
    data_dir = tmp_path / "tfds"
    flaxlm(
        "data",
        "build-tfds",
        "--train-files",
        f"{corpus}/train/*.txt",
        "--eval-files",
        f"{corpus}/eval/*.txt",
        "--data-dir",
        str(data_dir),
    )
    source = ["data.corpus=tfds", "data.tfds_name=flaxlm_text", f"data.tfds_data_dir={data_dir}"]
    out = flaxlm(
        "tokenizer",
        "train",
        "--config",
        "configs/tiny.yaml",
        "--vocab-size",
        "512",
        "--output",
        str(tmp_path / "spm"),
        *source,
    )
    model = tmp_path / "spm" / "sentencepiece.model"
    assert model.is_file() and str(model) in out.stdout
    run = tmp_path / "run"
    overrides = [*source, "data.tokenizer=sentencepiece", f"data.tokenizer_path={model}"]
    train = train_tiny(
        run, corpus_cache, *overrides, "train.steps=10", "model.vocab_size=512", devices=2
    )
    assert "bits per byte" in train.stdout
    assert (run / "tokenizer" / "sentencepiece.model").is_file()
    result = json.loads(flaxlm("eval", "--checkpoint", str(run), devices=2).stdout)
    # Bits per byte divide by the bytes of text, more than one per SentencePiece token (counting
    # tokens as bytes would give exactly loss / ln 2).
    assert result["step"] == 10
    assert 0 < result["bits_per_byte"] < 0.8 * result["loss"] / math.log(2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"]["tokens"] == result["tokens"]

    # The run carries its tokenizer: evaluation still works once the original file is gone.
    model.unlink()
    again = json.loads(flaxlm("eval", "--checkpoint", str(run), devices=2).stdout)
    assert again == result

    # to-hf carries the SentencePiece model: AutoTokenizer reads it as flaxlm does.
    transformers = pytest.importorskip("transformers")
    from flaxlm.data.tokenizer import SentencePieceTokenizer

    out = flaxlm("convert", "to-hf", str(run), str(tmp_path / "hf"), devices=1)
    assert "warning" not in out.stderr
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = SentencePieceTokenizer(run / "tokenizer" / "sentencepiece.model")
    code = (
        "def f(x):\n    return x  # keeps its indentation\n\n\tand tabs, 12345, é 日本 \U0001f600"
    )
    assert sp.decode(sp.encode(code)) == code  # text is kept as written
    for text in [code, "Once upon a time", "x  =  1", ""]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(sp.encode(text)) == text
    # Text starting with a space: Hugging Face adds no word boundary in front; decoding agrees.
    assert tok.decode(sp.encode("  indented")) == "  indented"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (sp.bos_id, sp.eos_id, 3)
