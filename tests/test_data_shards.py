"""Data shards: the global batch does not depend on the process count, and resumes exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flaxlm import config
from flaxlm.config import ConfigError
from flaxlm.data import pipeline


def _cfg(corpus_cache, *overrides):
    return config.load(
        None,
        [
            f"data.cache_dir={corpus_cache}",
            "data.seq_len=32",
            "model.max_seq_len=32",
            "data.global_batch_size=4",
            "data.shuffle_buffer=8",
            *overrides,
        ],
    )


def _global(iterators) -> dict[str, np.ndarray]:
    """The global batch: the processes' local batches in process order."""
    locals_ = [next(it) for it in iterators]
    return {k: np.concatenate([b[k] for b in locals_]) for k in locals_[0]}


def _assert_same(got, want, what):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert got[key].tobytes() == want[key].tobytes(), f"{what}: {key} differs"


def test_resume_at_step_7_on_2_or_1_processes_gives_batches_8_to_27(corpus_cache, tmp_path):
    cfg = _cfg(corpus_cache, "data.num_shards=2")
    single = pipeline.train_iterator(cfg.data, seed=5)  # P=1 owns both shards
    assert single.shards == [0, 1]
    expected = [next(single) for _ in range(27)]

    two = [pipeline.train_iterator(cfg.data, 5, p, 2) for p in (0, 1)]
    assert [it.shards for it in two] == [[0], [1]]
    for step in range(7):
        _assert_same(_global(two), expected[step], f"2 processes, batch {step + 1}")
    for it in two:  # each process writes the shards it owns into the one directory
        it.save(tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "num_shards.json",
        "shard_0",
        "shard_1",
    ]
    assert pipeline.saved_num_shards(tmp_path / "data") == 2

    as_two = [pipeline.train_iterator(cfg.data, 5, p, 2, num_shards=2) for p in (0, 1)]
    for it in as_two:
        it.restore(tmp_path / "data")
    as_one = pipeline.train_iterator(cfg.data, 5, 0, 1, num_shards=2)
    as_one.restore(tmp_path / "data")
    for step in range(7, 27):
        _assert_same(_global(as_two), expected[step], f"restored on 2, batch {step + 1}")
        _assert_same(next(as_one), expected[step], f"restored on 1, batch {step + 1}")


def test_shards_are_disjoint_and_independent_of_the_process_count(corpus_cache):
    cfg = _cfg(corpus_cache, "data.num_shards=4", "data.shuffle_buffer=1")
    one = next(pipeline.train_iterator(cfg.data, 0))
    four = _global([pipeline.train_iterator(cfg.data, 0, p, 4) for p in range(4)])
    _assert_same(four, one, "4 processes vs 1")
    rows = [bytes(r) for r in one["tokens"].astype(np.int32)]
    assert len(set(rows)) == 4  # one row per shard, each from its own files


def test_shard_and_process_counts_must_divide(corpus_cache):
    cfg = _cfg(corpus_cache, "data.num_shards=2")
    with pytest.raises(ConfigError, match="num_shards=2 is not a multiple of the 4 processes"):
        pipeline.train_iterator(cfg.data, 0, 0, 4)
    with pytest.raises(ConfigError, match=r"data\.num_shards=3 does not divide"):
        _cfg(corpus_cache, "data.num_shards=3")
    cfg = _cfg(corpus_cache)
    with pytest.raises(ConfigError, match="global_batch_size=4 is not divisible by the 8"):
        pipeline.train_iterator(cfg.data, 0, 0, 8)


def test_restoring_with_another_shard_count_is_refused(corpus_cache, tmp_path):
    cfg = _cfg(corpus_cache, "data.num_shards=2")
    it = pipeline.train_iterator(cfg.data, 0)
    next(it)
    it.save(tmp_path)
    other = pipeline.train_iterator(cfg.data, 0, num_shards=4)
    with pytest.raises(ConfigError, match="positions of 2 data shards"):
        other.restore(tmp_path)


def test_checkpointer_saves_every_shard_with_the_train_state(corpus_cache, tmp_path):
    import jax.numpy as jnp

    from flaxlm.checkpoint import Checkpointer

    cfg = _cfg(corpus_cache, "data.num_shards=2")
    expected = [next(it) for it in [pipeline.train_iterator(cfg.data, 2)] for _ in range(5)]
    data = pipeline.train_iterator(cfg.data, 2)
    for _ in range(3):
        next(data)
    checkpointer = Checkpointer(tmp_path, cfg.checkpoint)
    checkpointer.save(3, {"x": jnp.arange(4)}, data, cfg)
    checkpointer.wait()
    saved = tmp_path / "checkpoints" / "3" / "data"
    assert {"shard_0", "shard_1", "num_shards.json"} <= {p.name for p in saved.iterdir()}
    assert checkpointer.data_shards() == 2

    resumed = pipeline.train_iterator(cfg.data, 2, num_shards=checkpointer.data_shards())
    abstract = {"x": jax.ShapeDtypeStruct((4,), jnp.int32, sharding=_one_device())}
    state = checkpointer.restore(3, abstract, resumed)
    checkpointer.close()
    assert state["x"].tolist() == [0, 1, 2, 3]
    for i in (3, 4):
        _assert_same(next(resumed), expected[i], f"batch {i + 1} after the restore")


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
