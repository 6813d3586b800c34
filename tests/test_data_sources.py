"""Sources (TFDS by name, TFRecord, mixtures, a locally built TFDS dataset), tokenizers in the
pipeline (SentencePiece, Hugging Face), packing modes and bad documents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from flaxlm import config
from flaxlm.config import ConfigError
from flaxlm.data import packing, pipeline, sources, tokenize
from flaxlm.data.files import file_documents, resolve_files
from flaxlm.data.tokenizer import HFTokenizer, SentencePieceTokenizer


def _load(*overrides):
    return config.load(None, ["data.seq_len=32", "model.max_seq_len=32", *overrides])


def _texts(ds, n=None):
    ds = ds.take(n) if n else ds
    return [t for t in ds.as_numpy_iterator()]


def test_tfds_dataset_by_name():
    cfg = _load("data.corpus=tfds", "data.tfds_name=lm1b", "data.add_bos=false")
    with tfds.testing.mock_data(num_examples=12):
        texts = _texts(sources.tfds_documents(cfg.data, "train", 0, 1, None))
        batch = next(pipeline.train_iterator(cfg.data, seed=0))
    assert len(texts) == 12
    assert batch["tokens"].shape == (8, 32)
    # The rows are the mocked documents' bytes (separated by EOS).
    alphabet = set(b"".join(texts)) | {257}
    assert set(batch["tokens"].ravel().tolist()) <= alphabet


@pytest.fixture(scope="module")
def local_tfds(tmp_path_factory) -> str:
    """A real TFDS dataset built offline from local files (flaxlm.data.tfds_builder)."""
    from flaxlm.data.tfds_builder import build

    root = tmp_path_factory.mktemp("local-tfds")
    (root / "train").mkdir()
    (root / "eval").mkdir()
    for i in range(6):
        (root / "train" / f"{i}.txt").write_text(f"training document number {i}. " * 5)
    (root / "eval" / "e.jsonl").write_text(json.dumps({"text": "held out " * 40}) + "\n")
    build(f"{root}/train/*.txt", root / "data", f"{root}/eval/*.jsonl")
    return str(root / "data")


def test_local_tfds_dataset_is_split_into_disjoint_shards(local_tfds):
    cfg = _load(
        "data.corpus=tfds", "data.tfds_name=flaxlm_text", f"data.tfds_data_dir={local_tfds}"
    )
    whole = _texts(sources.tfds_documents(cfg.data, "train", 0, 1, None))
    parts = [_texts(sources.tfds_documents(cfg.data, "train", k, 3, None)) for k in range(3)]
    assert sorted(whole) == sorted(f"training document number {i}. ".encode() * 5 for i in range(6))
    assert all(len(p) == 2 for p in parts)
    assert sorted(t for p in parts for t in p) == sorted(whole)
    evals = pipeline.eval_batches(cfg.data)
    assert evals[0]["tokens"].shape == (8, 32)


def test_tfds_without_prepared_data_fails_early_naming_it(tmp_path):
    cfg = _load("data.corpus=tfds", "data.tfds_name=lm1b", f"data.tfds_data_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"lm1b.*prepare it there first"):
        pipeline.train_iterator(cfg.data, seed=0)


def test_tfrecord_files(tmp_path):
    docs = ["first record", "", "déjà vu"]
    with tf.io.TFRecordWriter(str(tmp_path / "d.tfrecord")) as w:
        for text in docs:
            feature = {
                "body": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))
            }
            w.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    cfg = _load("data.corpus=files", f"data.train_files={tmp_path}/*.tfrecord")
    with pytest.raises(ConfigError, match=r"no bytes feature 'text'.*'body'"):
        resolve_files(cfg.data, "", "train")
    cfg = _load(
        "data.corpus=files", f"data.train_files={tmp_path}/*.tfrecord", "data.text_field=body"
    )
    files = tf.data.Dataset.from_tensor_slices(resolve_files(cfg.data, "", "train"))
    got = _texts(file_documents(files, "body"))
    assert [t.decode() for t in got] == docs


def test_mixture_samples_by_weight(tmp_path):
    for name, letter in (("a", "A"), ("b", "B")):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"{i}.txt").write_text(letter * 10)
    cfg = _load(
        "data.corpus=mixture",
        f"data.mixture=[{{corpus: files, train_files: '{tmp_path}/a/*.txt', weight: 3}},"
        f" {{corpus: files, train_files: '{tmp_path}/b/*.txt', weight: 1}}]",
    )
    docs = _texts(pipeline._documents(cfg.data, seed=0, shard=0, num_shards=1), 800)
    share = np.mean([d.startswith(b"A") for d in docs])
    assert 0.7 < share < 0.8  # 3:1
    again = _texts(pipeline._documents(cfg.data, seed=0, shard=0, num_shards=1), 800)
    assert docs == again  # a function of the seed


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus_cache) -> str:
    from flaxlm.data.train_tokenizer import train_sentencepiece

    cfg = config.load(None, [f"data.cache_dir={corpus_cache}"])
    out = tmp_path_factory.mktemp("sp")
    return str(train_sentencepiece(cfg.data, 400, out, max_bytes=300_000))


def _hf_tokenizer(directory) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "déjà vu, naïve café"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    )
    return HFTokenizer(directory)


TEXTS = ["the lazy fox", "", "déjà vu — naïve 🦊 café", "x" * 300, "\xff\xfe bad bytes"]


def _encoded_by_pipeline(tok, texts, add_bos=True, add_eos=True, with_bytes=True):
    raw = [t.encode("latin-1") if t.startswith("\xff") else t.encode() for t in texts]
    docs = tf.data.Dataset.from_tensor_slices(raw)
    ds = tokenize.tokenize_documents(docs, tok, add_bos, add_eos, with_bytes)
    return raw, list(ds.as_numpy_iterator())


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_library_tokenizers_in_the_pipeline_match_the_library(kind, sp_model, tmp_path):
    tok = (
        SentencePieceTokenizer(sp_model)
        if kind == "sentencepiece"
        else _hf_tokenizer(tmp_path / "t")
    )
    before = dict(tokenize.STATS)
    raw, docs = _encoded_by_pipeline(tok, TEXTS)
    kept = [r for r in raw if r]
    assert len(docs) == len(kept)  # the empty document is dropped
    assert tokenize.STATS["empty_documents"] - before.get("empty_documents", 0) == 1
    assert tokenize.STATS["invalid_utf8_documents"] - before.get("invalid_utf8_documents", 0) == 1
    for text, doc in zip(kept, docs, strict=True):
        string = text.decode("utf-8", errors="replace")
        # Oracle: the library's own single-text encoder, plus BOS/EOS.
        want = [tok.bos_id, *_library_ids(tok, string), tok.eos_id]
        assert doc["ids"].tolist() == want
        # Bits per byte: the tokens' byte counts add up to the UTF-8 text, specials count 0.
        assert doc["bytes"].sum() == len(string.encode("utf-8"))
        assert doc["bytes"][0] == 0 and doc["bytes"][-1] == 0
    # Training skips the byte accounting; the ids are the same.
    _, fast = _encoded_by_pipeline(tok, TEXTS, with_bytes=False)
    assert [d["ids"].tolist() for d in fast] == [d["ids"].tolist() for d in docs]


def _library_ids(tok, text):
    if isinstance(tok, SentencePieceTokenizer):
        return tok._sp.encode(text)
    return tok._tok.encode(text, add_special_tokens=False).ids


def test_byte_tokenizer_keeps_invalid_utf8_bytes_and_counts_them():
    from flaxlm.data.tokenizer import ByteTokenizer

    raw, docs = _encoded_by_pipeline(ByteTokenizer(), TEXTS, add_bos=False, add_eos=True)
    kept = [r for r in raw if r]
    for text, doc in zip(kept, docs, strict=True):
        assert doc["ids"].tolist() == [*text, ByteTokenizer.eos_id]


def test_concat_packing_keeps_the_token_stream_and_drops_the_boundaries(corpus_cache):
    args = [f"data.cache_dir={corpus_cache}", "data.shuffle_buffer=1"]
    docs = next(pipeline.train_iterator(_load(*args).data, seed=0))
    concat = next(pipeline.train_iterator(_load(*args, "data.packing=concat").data, seed=0))
    np.testing.assert_array_equal(concat["tokens"], docs["tokens"])
    assert (concat["segment_ids"] == 1).all()
    np.testing.assert_array_equal(concat["positions"], np.tile(np.arange(32), (8, 1)))
    assert packing.padding_fraction(docs) == 0.0


def test_sentencepiece_pipeline_resumes_exactly(sp_model, corpus_cache, tmp_path):
    cfg = _load(
        f"data.cache_dir={corpus_cache}",
        "data.tokenizer=sentencepiece",
        f"data.tokenizer_path={sp_model}",
        "data.global_batch_size=2",
    ).data
    expected = [next(it) for it in [pipeline.train_iterator(cfg, 1)] for _ in range(6)]
    it = pipeline.train_iterator(cfg, 1)
    for _ in range(3):
        next(it)
    it.save(tmp_path)
    resumed = pipeline.train_iterator(cfg, 1)
    resumed.restore(tmp_path)
    for i in range(3, 6):
        assert next(resumed)["tokens"].tobytes() == expected[i]["tokens"].tobytes()
    assert expected[0]["tokens"].max() < 400  # SentencePiece ids, not bytes


def test_missing_tokenizer_file_fails_early_with_the_path(tmp_path):
    cfg = _load("data.tokenizer=sentencepiece", f"data.tokenizer_path={tmp_path}/none.model")
    with pytest.raises(ConfigError, match=r"none\.model"):
        pipeline.train_iterator(cfg.data, 0)


def test_files_without_any_text_fail_early_instead_of_hanging(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}))
    cfg = _load("data.corpus=files", f"data.train_files={tmp_path}/*.jsonl")
    with pytest.raises(ConfigError, match=r"a\.jsonl.*hold no non-empty document"):
        pipeline.train_iterator(cfg.data, 0)
