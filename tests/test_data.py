"""The input pipeline: corpus, packing, sharding, exact resume, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from flaxlm import config
from flaxlm.config import ConfigError
from flaxlm.data import packing, pipeline
from flaxlm.data.corpus import build_python_docs, is_eval_document
from flaxlm.data.files import file_documents, resolve_files
from flaxlm.data.tokenizer import ByteTokenizer


def test_python_docs_corpus_is_real_text_with_a_disjoint_eval_split(corpus_cache):
    root = build_python_docs(corpus_cache)
    train = {p.name for p in (root / "train").glob("*.txt")}
    held_out = {p.name for p in (root / "eval").glob("*.txt")}
    assert len(train) > 300 and len(held_out) > 10
    assert not train & held_out
    assert all(is_eval_document(name.removesuffix(".txt")) for name in held_out)
    text = (root / "train" / "topic-if.txt").read_text()
    assert "if" in text and "else" in text  # the reference documentation of `if`


def test_packing_matches_a_python_reference():
    docs = [list(range(1, 6)), list(range(10, 23)), [30], list(range(40, 47))]
    seq_len = 8
    ds = tf.data.Dataset.from_generator(
        lambda: iter(docs), output_signature=tf.TensorSpec([None], tf.int32)
    )
    rows = list(packing.pack_documents(ds, seq_len).as_numpy_iterator())
    # Reference: concatenate, tag each token with its document, cut rows.
    flat = [(tok, d) for d, doc in enumerate(docs) for tok in doc]
    assert len(rows) == len(flat) // seq_len
    for r, row in enumerate(rows):
        chunk = flat[r * seq_len : (r + 1) * seq_len]
        np.testing.assert_array_equal(row["tokens"], [tok for tok, _ in chunk])
        doc_ids = [d for _, d in chunk]
        expected_segments = np.array(doc_ids) - doc_ids[0] + 1
        np.testing.assert_array_equal(row["segment_ids"], expected_segments)
        for i in range(seq_len):
            # Position = distance from the start of its document within this row.
            start = i
            while start > 0 and doc_ids[start - 1] == doc_ids[i]:
                start -= 1
            assert row["positions"][i] == i - start


def test_long_documents_are_split_not_dropped(tmp_path, corpus_cache):
    long_doc = "x" * 1000
    (tmp_path / "a.txt").write_text(long_doc)
    cfg = config.load(
        None,
        [
            "data.corpus=files",
            f"data.train_files={tmp_path}/*.txt",
            "data.seq_len=64",
            "model.max_seq_len=64",
            "data.global_batch_size=1",
            "data.shuffle_buffer=1",
        ],
    )
    it = pipeline.train_iterator(cfg.data, seed=0)
    tokens = np.concatenate([next(it)["tokens"][0] for _ in range(16)])  # one epoch = 1002 ids
    tok = ByteTokenizer()
    assert tokens[0] == tok.bos_id
    assert tok.decode(tokens[:1002]) == long_doc  # every byte, in order
    assert tokens[1001] == tok.eos_id


def test_jsonl_and_bad_documents(tmp_path):
    lines = [
        json.dumps({"text": "first document"}),
        "not json at all",
        json.dumps({"text": ""}),
        json.dumps({"text": "second déjà vu"}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config.load(
        None, ["data.corpus=files", f"data.train_files={tmp_path}/*.jsonl", "data.add_bos=false"]
    )
    files = tf.data.Dataset.from_tensor_slices(resolve_files(cfg.data, cfg.data.cache_dir, "train"))
    texts = [t.decode() for t in file_documents(files).as_numpy_iterator()]
    assert texts == ["first document", "", "", "second déjà vu"]  # bad lines become empty


def test_missing_and_empty_data_fail_early_with_the_path(tmp_path):
    cfg = config.load(None, ["data.corpus=files", f"data.train_files={tmp_path}/nothing/*.txt"])
    with pytest.raises(ConfigError, match="nothing"):
        pipeline.train_dataset(cfg.data, seed=0)
    (tmp_path / "empty.txt").write_text("")
    cfg = config.load(None, ["data.corpus=files", f"data.train_files={tmp_path}/*.txt"])
    with pytest.raises(ConfigError, match="empty"):
        pipeline.train_dataset(cfg.data, seed=0)


def _cfg(corpus_cache, *overrides):
    return config.load(
        None,
        [f"data.cache_dir={corpus_cache}", "data.seq_len=64", "model.max_seq_len=64", *overrides],
    )


def test_order_is_a_function_of_the_seed(corpus_cache):
    cfg = _cfg(corpus_cache)
    first = [next(pipeline.train_iterator(cfg.data, seed=s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(first[0]["tokens"], first[1]["tokens"])
    assert not np.array_equal(first[0]["tokens"], first[2]["tokens"])


def test_processes_read_disjoint_shares(corpus_cache):
    cfg = _cfg(corpus_cache, "data.global_batch_size=8", "data.shuffle_buffer=1")
    seen = []
    for process in (0, 1):
        it = pipeline.train_iterator(cfg.data, 0, process, 2)
        batch = next(it)
        assert batch["tokens"].shape == (4, 64)  # half the global batch each
        seen.append({bytes(row) for row in batch["tokens"].astype(np.int32)})
    assert not seen[0] & seen[1]


def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(corpus_cache, tmp_path):
    cfg = _cfg(corpus_cache)
    uninterrupted = pipeline.train_iterator(cfg.data, seed=3)
    expected = [next(uninterrupted) for _ in range(27)]

    interrupted = pipeline.train_iterator(cfg.data, seed=3)
    for _ in range(7):
        next(interrupted)
    interrupted.save(tmp_path / "position")
    resumed = pipeline.train_iterator(cfg.data, seed=3)
    resumed.restore(tmp_path / "position")
    for i in range(7, 27):
        got = next(resumed)
        for key in got:
            np.testing.assert_array_equal(got[key], expected[i][key], err_msg=f"batch {i} {key}")


def test_eval_set_is_fixed_and_split_between_processes(corpus_cache):
    cfg = _cfg(corpus_cache, "data.eval_batches=2")
    whole = pipeline.eval_batches(cfg.data)
    again = pipeline.eval_batches(cfg.data)
    halves = [pipeline.eval_batches(cfg.data, p, 2) for p in (0, 1)]
    assert len(whole) == 2
    for i in range(2):
        np.testing.assert_array_equal(whole[i]["tokens"], again[i]["tokens"])
        joined = np.concatenate([halves[0][i]["tokens"], halves[1][i]["tokens"]])
        np.testing.assert_array_equal(joined, whole[i]["tokens"])


def test_jsonl_without_a_text_field_fails_early_naming_the_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"content": "misnamed field"}) + "\n")
    cfg = config.load(None, ["data.corpus=files", f"data.train_files={tmp_path}/*.jsonl"])
    with pytest.raises(
        ConfigError, match=r"line 1 has no string field 'text' \(it has \['content'\]\)"
    ):
        pipeline.train_dataset(cfg.data, seed=0)


def test_hf_tokenizer_adds_bos_only_when_asked(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from flaxlm.data.tokenizer import HFTokenizer
    from flaxlm.run_dir import load_tokenizer

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    (tmp_path / "tokenizer").mkdir()
    tok.save(str(tmp_path / "tokenizer" / "tokenizer.json"))
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("a b", add_bos=True) == [0, 2, 3]  # Llama-style: BOS from the template
    assert loaded.encode("a b", add_bos=False) == [2, 3]
    assert (loaded.bos_id, loaded.eos_id) == (0, 1)
