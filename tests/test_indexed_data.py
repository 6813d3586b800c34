"""The token cache and its index-based order: elastic resume with a data position of bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import CONFIGS
from gcs_emulator import gcs  # noqa: F401 - the fixture
from helpers import flaxlm, flaxlm_processes, train_losses

from flaxlm import config
from flaxlm.config import ConfigError
from flaxlm.data import pipeline, token_cache
from flaxlm.data.indexed import POSITION_FILE, IndexedIterator, permute
from flaxlm.data.packing import pack_documents
from flaxlm.data.tokenizer import ByteTokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "mu"]


def _documents(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(n)]
    if n > 3:
        docs[3] = ""  # empty documents are dropped, as in the streaming pipeline
    return docs


def _write_source(directory, name: str, seed: int, per_file: int = 12) -> list[str]:
    """Three .jsonl files of documents; returns the documents in sorted-file order."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(3):
        docs = _documents(seed * 10 + f, per_file)
        lines = [json.dumps({"text": d}) for d in docs]
        (directory / f"{name}-{f}.jsonl").write_text("\n".join(lines) + "\n")
        texts += docs
    return texts


def _cfg(tmp_path, *overrides: str, mixture: bool = False):
    if mixture:
        for name, seed, per_file in (("prose", 1, 12), ("code", 2, 1)):
            _write_source(tmp_path / name, name, seed, per_file)
        spec = tmp_path / "mixture.yaml"
        spec.write_text(
            "data:\n  corpus: mixture\n  mixture:\n"
            f"    - {{corpus: files, train_files: '{tmp_path}/prose/*.jsonl', weight: 2.0}}\n"
            f"    - {{corpus: files, train_files: '{tmp_path}/code/*.jsonl', weight: 1.0}}\n"
        )
        files = [spec]
    else:
        files = []
    return config.load_files(
        [CONFIGS / "tiny.yaml", *files],
        [
            f"data.token_cache={tmp_path / 'cache'}",
            "data.seq_len=16",
            "model.max_seq_len=16",
            "data.global_batch_size=4",
            *overrides,
        ],
    )


def test_the_permutation_is_a_bijection_that_depends_on_its_key():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        got = permute(np.arange(n), n, key=7)
        assert sorted(got.tolist()) == list(range(n)), n
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert (a != np.arange(1000)).mean() > 0.9 and (a != b).mean() > 0.9
    # Random access: any subset of indices maps as the whole does.
    np.testing.assert_array_equal(permute(np.array([999, 5, 17]), 1000, 1), a[[999, 5, 17]])


@pytest.mark.parametrize("packing", ["documents", "concat"])
def test_the_cache_holds_the_tokenized_documents_in_rows_packed_as_the_stream_packs(
    tmp_path, packing
):
    texts = _write_source(tmp_path / "docs", "docs", 3)
    cfg = _cfg(
        tmp_path, "data.corpus=files", f"data.train_files={tmp_path}/docs/*.jsonl",
        f"data.packing={packing}",
    )  # fmt: skip
    meta = token_cache.build(cfg.data, log=lambda _: None)
    tok = ByteTokenizer()
    # Oracle 1: every non-empty document, tokenized alone, BOS and EOS around it, in order.
    docs = [tok.encode(t, add_bos=True, add_eos=True) for t in texts if t]
    assert meta["sources"][0]["documents"] == len(docs)
    flat = np.fromfile(tmp_path / "cache" / "source_0.tokens", np.uint16)
    np.testing.assert_array_equal(flat, np.concatenate(docs))
    # Oracle 2: the streaming pipeline's packing of the same documents.
    stream = tf.data.Dataset.from_generator(
        lambda: (np.array(d, np.int32) for d in docs),
        output_signature=tf.TensorSpec([None], tf.int32),
    )
    want = list(pack_documents(stream, 16, packing).as_numpy_iterator())
    cache = token_cache.TokenCache(cfg.data)
    assert cache.rows_per_source == [len(want)]
    for r, row in enumerate(want):
        got = cache.row(0, r)
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(got[key], row[key], err_msg=f"row {r} {key}")
    assert max(r["segment_ids"].max() for r in want) > 1 or packing == "concat"


def _global(iterators) -> dict[str, np.ndarray]:
    parts = [next(it) for it in iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_a_position_saved_on_p_processes_resumes_on_q_with_the_same_batches(tmp_path):
    cfg = _cfg(tmp_path, mixture=True)
    token_cache.build(cfg.data, log=lambda _: None)
    single = IndexedIterator(cfg.data, seed=5)
    expected = [next(single) for _ in range(24)]
    # The mixture draws both components, and the small one wraps into its next epoch.
    rows = single.cache.rows_per_source
    assert (
        all(c > 0 for c in single.consumed)
        and max(c / n for c, n in zip(single.consumed, rows, strict=True)) > 1
    )
    matrix = {}
    for p in (1, 2, 4):
        saving = [IndexedIterator(cfg.data, 5, i, p) for i in range(p)]
        for step in range(6):
            got = _global(saving)
            for key, want in expected[step].items():
                np.testing.assert_array_equal(got[key], want, err_msg=f"P={p} batch {step}")
        saved = tmp_path / f"saved-{p}"
        for it in saving:
            it.save(saved)
        size = (saved / POSITION_FILE).stat().st_size
        assert [f.name for f in saved.iterdir()] == [POSITION_FILE] and size < 200
        for q in (1, 2, 4):
            resumed = [IndexedIterator(cfg.data, 5, i, q) for i in range(q)]
            for it in resumed:
                it.restore(saved)
            for step in range(6, 24):
                got = _global(resumed)
                for key, want in expected[step].items():
                    np.testing.assert_array_equal(got[key], want, err_msg=f"{p}->{q} {step}")
            matrix[(p, q)] = True
    assert len(matrix) == 9


def test_wrong_caches_and_positions_are_refused_with_the_fix(tmp_path, corpus_cache):
    cfg = _cfg(tmp_path, f"data.cache_dir={corpus_cache}")
    with pytest.raises(ConfigError, match="flaxlm data tokenize"):
        IndexedIterator(cfg.data, 0)
    token_cache.build(cfg.data, log=lambda _: None)
    with pytest.raises(ConfigError, match="--overwrite"):
        token_cache.build(cfg.data, log=lambda _: None)
    other = _cfg(tmp_path, f"data.cache_dir={corpus_cache}", "data.add_eos=false")
    with pytest.raises(ConfigError, match="add_eos"):
        IndexedIterator(other.data, 0)
    it = IndexedIterator(cfg.data, 0)
    next(it)
    it.save(tmp_path / "pos")
    longer = _cfg(tmp_path, f"data.cache_dir={corpus_cache}", "data.seq_len=8")
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        IndexedIterator(longer.data, 0).restore(tmp_path / "pos")
    # A streaming run and a token-cache run do not read each other's positions.
    stream = _cfg(tmp_path, f"data.cache_dir={corpus_cache}", "data.token_cache=null")
    with pytest.raises(ConfigError, match=r"data\.token_cache"):
        pipeline.train_iterator(stream.data, 0).restore(tmp_path / "pos")
    with pytest.raises(ConfigError, match="num_shards"):
        _cfg(tmp_path, "data.num_shards=2")


@pytest.mark.slow
def test_a_run_saved_by_one_process_resumes_on_two_with_the_same_losses(tmp_path, corpus_cache):
    """What the streaming pipeline cannot do: its data shards are fixed by the first start."""
    common = [
        *("--config", str(CONFIGS / "tiny.yaml"), f"data.cache_dir={corpus_cache}"),
        f"data.token_cache={tmp_path / 'cache'}",
        *("train.progress_bar=false", "train.tensorboard=false", "train.eval_every=0"),
        *("train.sample_prompt=", "train.log_every=1", "checkpoint.every_steps=3"),
    ]
    flaxlm("data", "tokenize", *common[:4])
    whole, part = tmp_path / "whole", tmp_path / "part"
    flaxlm("train", *common, f"train.run_dir={whole}", "train.steps=6", devices=4)
    flaxlm("train", *common, f"train.run_dir={part}", "train.steps=3", devices=4)
    assert (part / "checkpoints" / "3" / "data" / POSITION_FILE).is_file()
    args = ["train", *common, f"train.run_dir={part}", "train.steps=6"]
    procs = flaxlm_processes(2, 2, *args, "mesh.dcn_data=2")
    assert "resumed from" in procs[0].stderr
    want, got = train_losses(whole), train_losses(part)
    assert sorted(got) == list(range(1, 7))
    for step in (4, 5, 6):
        np.testing.assert_allclose(got[step], want[step], rtol=2e-5, err_msg=f"step {step}")


def test_a_tfds_source_is_cached_document_for_document(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = _cfg(
        tmp_path, "data.corpus=tfds", "data.tfds_name=lm1b", f"data.tfds_data_dir={tmp_path}/tfds"
    )
    with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path / "tfds")):
        meta = token_cache.build(cfg.data, log=lambda _: None)
        texts = [x["text"] for x in tfds.load("lm1b", split="train").as_numpy_iterator()]
    tok = ByteTokenizer()
    docs = [tok.encode(t.decode("utf-8", "replace"), True, True) for t in texts if t]
    assert meta["sources"][0]["documents"] == len(docs) > 0
    flat = np.fromfile(tmp_path / "cache" / "source_0.tokens", np.uint16)
    np.testing.assert_array_equal(flat, np.concatenate(docs))


@pytest.mark.slow
def test_a_cache_on_an_object_store_reads_the_same_rows(tmp_path, gcs):  # noqa: F811
    _write_source(tmp_path / "docs", "docs", 4)
    files = ("data.corpus=files", f"data.train_files={tmp_path}/docs/*.jsonl")
    local = _cfg(tmp_path, *files)
    remote = _cfg(tmp_path, *files, "data.token_cache=gs://flaxlm-test/token-cache")
    for cfg in (local, remote):
        token_cache.build(cfg.data, log=lambda _: None)
    a, b = IndexedIterator(local.data, 3), IndexedIterator(remote.data, 3)
    for step in range(5):
        want, got = next(a), next(b)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {step} {key}")
    b.close()
