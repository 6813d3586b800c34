"""The tf.data input pipeline: data shards -> tokenized, packed rows -> the process's batch.

The training data are V *data shards* (`data.num_shards`; by default the process count of the
run that first starts, saved with every checkpoint). Shard k is an independent tf.data stream:
its share of the documents (`flaxlm.data.sources`) in an order seeded by (seed, k), tokenized
(`flaxlm.data.tokenize`), packed into rows (`flaxlm.data.packing`), shuffled in a buffer and
batched to `global_batch / V` rows. The global batch of a step is the concatenation of the
shards' row-blocks in shard order, so it is the same whatever the number of processes P:
process p owns shards [p*V/P, (p+1)*V/P) and its local batch is its shards' blocks, in order.

Each shard's iterator position is saved with each checkpoint (`DataIterator.save` / `restore`,
one `shard_<k>/` per shard through `tf.train.Checkpoint`); a process restores the shards it
owns, so a checkpoint written by 2 processes restores onto 1 (or 4, if V allows) exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from flaxlm.config import ConfigError, DataConfig, Objective
from flaxlm.data import sources
from flaxlm.data.indexed import POSITION_FILE, IndexedIterator
from flaxlm.data.masking import mask_dataset
from flaxlm.data.packing import pack_documents
from flaxlm.data.tokenize import tokenize_documents
from flaxlm.data.tokenizer import Tokenizer, from_config

# TensorFlow only feeds data here: keep it off any accelerator that JAX is going to use.
tf.config.set_visible_devices([], "GPU")

HostBatch = dict[str, np.ndarray]  # one process's rows; train.Batch is the global jax.Array one
SHARDS_FILE = "num_shards.json"
# The masks of the eval set do not depend on the run's seed: runs compare on the same tokens.
EVAL_MASK_SEED = 12345


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # The JSON parser and library tokenizers are pure numpy_functions; their absence of state is
    # safe to ignore when the iterator is checkpointed.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return options


def _documents(cfg: DataConfig, seed: int, shard: int, num_shards: int) -> tf.data.Dataset:
    """Endless document texts of one data shard (a weighted mixture if so configured)."""
    parts = sources.components(cfg)
    # Each shard has its own seeds; shard 0 of 1 uses the seed itself.
    file_seed = seed + 1_000_003 * shard
    streams = [
        sources.shard_documents(src, cfg.cache_dir, file_seed + 7919 * i, shard, num_shards, where)
        for i, (src, _, where) in enumerate(parts)
    ]
    if len(streams) == 1:
        return streams[0]
    weights = [w / sum(w for _, w, _ in parts) for _, w, _ in parts]
    return tf.data.Dataset.sample_from_datasets(
        streams, weights=weights, seed=file_seed + 1, rerandomize_each_iteration=False
    )


def shard_dataset(
    cfg: DataConfig,
    seed: int,
    shard: int,
    num_shards: int,
    tok: Tokenizer | None = None,
    objective: Objective = Objective.clm,
) -> tf.data.Dataset:
    """Endless, shuffled row-blocks (global_batch / V rows) of data shard k of V; masked for
    the masked-LM objective (keyed on the seed, the shard and the block's index)."""
    tok = tok or from_config(cfg)
    docs = _documents(cfg, seed, shard, num_shards)
    ds = tokenize_documents(docs, tok, cfg.add_bos, cfg.add_eos, with_bytes=False)
    ds = pack_documents(ds, cfg.seq_len, cfg.packing)
    if cfg.shuffle_buffer > 1:
        ds = ds.shuffle(
            cfg.shuffle_buffer, seed=seed + 1 + 1_000_003 * shard, reshuffle_each_iteration=True
        )
    ds = ds.batch(cfg.global_batch_size // num_shards, drop_remainder=True)
    if objective == Objective.mlm:
        ds = mask_dataset(ds, tok, cfg.mask_rate, seed + 2 + 1_000_003 * shard)
    return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)


def owned_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The data shards process p of P reads: [p*V/P, (p+1)*V/P)."""
    if num_shards % process_count:
        raise ConfigError(
            f"data.num_shards={num_shards} is not a multiple of the {process_count} processes; "
            "each process reads an equal number of data shards (set data.num_shards to a "
            "multiple of the process count; a resumed run keeps the value of its checkpoint)"
        )
    per = num_shards // process_count
    return range(process_index * per, (process_index + 1) * per)


def check_shards(cfg: DataConfig, num_shards: int) -> None:
    if cfg.global_batch_size % num_shards:
        raise ConfigError(
            f"data.global_batch_size={cfg.global_batch_size} is not divisible by the "
            f"{num_shards} data shards (data.num_shards, or the process count when it is 0); "
            "each data shard gives an equal block of rows"
        )


def train_iterator(
    cfg: DataConfig,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_shards: int | None = None,
    objective: Objective = Objective.clm,
) -> DataIterator | IndexedIterator:
    """The checkpointable iterator of this process's batches of the train split.

    num_shards: the V of a checkpoint being resumed; else data.num_shards, else process_count.
    With data.token_cache set, the index-based iterator of the cache (no data shards).
    """
    if cfg.token_cache:
        return IndexedIterator(cfg, seed, process_index, process_count)
    v = num_shards or cfg.num_shards or process_count
    check_shards(cfg, v)
    shards = owned_shards(v, process_index, process_count)
    tok = from_config(cfg)
    datasets = {k: shard_dataset(cfg, seed, k, v, tok, objective) for k in shards}
    return DataIterator(datasets, v)


def train_dataset(
    cfg: DataConfig, seed: int, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
    """This process's batches as one tf.data dataset (its shards zipped and concatenated).

    For reading, benchmarks and tests; training uses `train_iterator`, whose position is saved
    per data shard.
    """
    v = cfg.num_shards or process_count
    check_shards(cfg, v)
    tok = from_config(cfg)
    parts = [
        shard_dataset(cfg, seed, k, v, tok) for k in owned_shards(v, process_index, process_count)
    ]
    if len(parts) == 1:
        return parts[0]
    return tf.data.Dataset.zip(tuple(parts)).map(
        lambda *bs: {key: tf.concat([b[key] for b in bs], axis=0) for key in bs[0]}
    )


def eval_batches(
    cfg: DataConfig,
    process_index: int = 0,
    process_count: int = 1,
    objective: Objective = Objective.clm,
) -> list[HostBatch]:
    """The fixed eval set: the first `eval_batches` global batches of the eval split, in order.

    Every process packs the whole (small) eval split and keeps its rows of each global batch.
    Rows carry `bytes` (bytes of text per token) for bits per byte. For the masked-LM
    objective the global batches are masked with a fixed seed: every evaluation of every
    checkpoint predicts the same tokens.
    """
    if cfg.global_batch_size % process_count:
        raise ConfigError(
            f"data.global_batch_size={cfg.global_batch_size} is not divisible by the "
            f"{process_count} processes; each process feeds an equal share"
        )
    local_batch = cfg.global_batch_size // process_count
    parts = sources.components(cfg)
    streams = [sources.eval_documents(src, cfg.cache_dir, where) for src, _, where in parts]
    if len(streams) == 1:
        docs = streams[0]
    else:
        weights = [w / sum(w for _, w, _ in parts) for _, w, _ in parts]
        docs = tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=0)
    tok = from_config(cfg)
    ds = tokenize_documents(docs, tok, cfg.add_bos, cfg.add_eos)
    ds = pack_documents(ds, cfg.seq_len, cfg.packing, with_bytes=True)
    ds = ds.batch(cfg.global_batch_size, drop_remainder=True)
    if objective == Objective.mlm:
        ds = mask_dataset(ds, tok, cfg.mask_rate, seed=EVAL_MASK_SEED)
    ds = ds.with_options(_options())
    batches = []
    lo, hi = process_index * local_batch, (process_index + 1) * local_batch
    for batch in ds.take(cfg.eval_batches).as_numpy_iterator():
        batches.append({k: v[lo:hi] for k, v in batch.items()})
    if not batches:
        raise ConfigError(
            f"the eval split ({', '.join(w for _, _, w in parts)}) has fewer than seq_len x "
            f"global_batch_size = {cfg.seq_len * cfg.global_batch_size} tokens; add eval data "
            "or shrink the batch"
        )
    return batches


class DataIterator:
    """A checkpointable iterator of numpy batches over the data shards this process owns.

    `datasets` maps shard k to its dataset (`train_iterator` builds it); `num_shards` is V, the
    number of data shards of the whole job.
    """

    def __init__(self, datasets: dict[int, tf.data.Dataset], num_shards: int):
        self.num_shards = num_shards
        self.shards = sorted(datasets)
        self._iterators = {k: iter(datasets[k]) for k in self.shards}
        self._checkpoints = {
            k: tf.train.Checkpoint(iterator=it) for k, it in self._iterators.items()
        }

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> HostBatch:
        blocks = [next(self._iterators[k]) for k in self.shards]
        if len(blocks) == 1:
            return {key: v.numpy() for key, v in blocks[0].items()}
        return {key: np.concatenate([b[key].numpy() for b in blocks]) for key in blocks[0]}

    def close(self) -> None:
        """Ends the shards' tf.data iterators (and their background threads) now, rather than
        whenever the last reference to this object goes; the iterator is spent afterwards."""
        self._checkpoints.clear()
        self._iterators.clear()

    def save(self, directory: str | os.PathLike) -> None:
        """Writes each owned shard's position under directory/shard_<k>/, and V."""
        for k in self.shards:
            path = Path(directory) / f"shard_{k}"
            path.mkdir(parents=True, exist_ok=True)
            self._checkpoints[k].write(os.fspath(path / "iterator"))
        if self.shards[0] == 0:  # the owner of shard 0 records V, once
            (Path(directory) / SHARDS_FILE).write_text(json.dumps({"num_shards": self.num_shards}))

    def restore(self, directory: str | os.PathLike) -> None:
        """Reads each owned shard's position; the checkpoint must have the same V."""
        saved = saved_num_shards(directory)
        if saved is not None and saved != self.num_shards:
            raise ConfigError(
                f"{directory} holds the positions of {saved} data shards, but this iterator "
                f"has {self.num_shards}; build it with num_shards={saved}"
            )
        if (Path(directory) / POSITION_FILE).exists():
            raise ConfigError(
                f"{directory} holds the data position of a token cache ({POSITION_FILE}): the "
                "run was trained with data.token_cache; resume it with the same data.token_cache"
            )
        for k in self.shards:
            path = Path(directory) / f"shard_{k}"
            if not path.exists():
                raise FileNotFoundError(
                    f"{directory} has no position for data shard {k} (it holds "
                    f"{sorted(p.name for p in Path(directory).iterdir())})"
                )
            self._checkpoints[k].read(os.fspath(path / "iterator")).assert_consumed()


def saved_num_shards(directory: str | os.PathLike) -> int | None:
    """The V recorded in a saved data position, or None (none there)."""
    path = Path(directory) / SHARDS_FILE
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["num_shards"])
