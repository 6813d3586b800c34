"""Long documents: tokenization memory follows the text, not the longest document times the
batch, and encoding a long document in pieces gives the ids of encoding it whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from flaxlm.data import tokenize
from flaxlm.data.tokenizer import ByteTokenizer, HFTokenizer


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )  # fmt: skip
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return HFTokenizer(directory)


def _documents(texts: list[bytes], tok, with_bytes=True) -> list[dict]:
    ds = tokenize.tokenize_documents(
        tf.data.Dataset.from_tensor_slices(texts), tok, add_bos=True, add_eos=True,
        with_bytes=with_bytes,
    )  # fmt: skip
    return [{k: v.numpy().tolist() for k, v in d.items()} for d in ds]


def test_byte_documents_of_very_different_lengths_keep_their_bytes():
    texts = [b"a", "caf\u00e9 ".encode() * 3000, b"xyz", bytes(range(1, 200))]
    tok = ByteTokenizer()
    docs = _documents(texts, tok)
    assert [d["ids"] for d in docs] == [[tok.bos_id, *t, tok.eos_id] for t in texts]
    assert [sum(d["bytes"]) for d in docs] == [len(t) for t in texts]


def test_a_long_document_encodes_in_pieces_as_it_does_whole(bpe, monkeypatch):
    text = " ".join(f"the quick brown fox {i} jumps \u00e9t\u00e9" for i in range(300)).encode()
    whole = _documents([b"short one", text], bpe)
    monkeypatch.setattr(tokenize, "CHUNK_BYTES", 200)
    assert len(tokenize._chunks(text)) > 30
    assert b"".join(tokenize._chunks(text)) == text
    pieces = _documents([b"short one", text], bpe)
    assert pieces == whole
    assert sum(pieces[1]["bytes"]) == len(text)
    assert np.all(np.asarray(pieces[1]["ids"]) < 400)
