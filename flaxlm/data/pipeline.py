"""The tf.data input pipeline: documents -> byte tokens -> packed rows -> process-local batches.

Each process reads a disjoint share of the files (file-level sharding), shuffles them with the
seed, tokenizes inside the tf.data graph, and packs documents end to end into rows of `seq_len`
tokens. Every row carries `segment_ids` (1, 2, ... per document within the row) and `positions`
(restarting at 0 where a document starts, and at the start of each row), so that the model
never attends across documents. A document longer than a row continues in the next row, its
positions counting again from 0 there. Rows are shuffled in a buffer and batched
to this process's share of the global batch.

The iterator's position is saved with each checkpoint (`DataIterator.save` / `restore`, through
`tf.train.Checkpoint`), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from flaxlm.config import ConfigError, DataConfig
from flaxlm.data.corpus import resolve_files
from flaxlm.data.tokenizer import ByteTokenizer

# TensorFlow only feeds data here: keep it off any accelerator that JAX is going to use.
tf.config.set_visible_devices([], "GPU")

Batch = dict[str, np.ndarray]


def _jsonl_text(line: tf.Tensor) -> tf.Tensor:
    def parse(raw: bytes) -> bytes:
        try:
            text = json.loads(raw.decode("utf-8")).get("text", "")
        except (ValueError, AttributeError):
            text = ""  # a malformed line is skipped (as an empty document), not fatal
        return str(text).encode("utf-8")

    return tf.numpy_function(parse, [line], tf.string, stateful=False)


def _documents(file_ds: tf.data.Dataset) -> tf.data.Dataset:
    """File names -> document texts (a .txt file is one document, a .jsonl line is one)."""

    def read(path: tf.Tensor) -> tf.data.Dataset:
        is_jsonl = tf.strings.regex_full_match(path, r".*\.jsonl")
        return tf.cond(
            is_jsonl,
            lambda: tf.data.TextLineDataset(path).map(_jsonl_text).map(lambda t: tf.reshape(t, [])),
            lambda: tf.data.Dataset.from_tensors(tf.io.read_file(path)),
        )

    return file_ds.flat_map(read).filter(lambda text: tf.strings.length(text) > 0)


def _tokenize(cfg: DataConfig):
    tok = ByteTokenizer

    def fn(text: tf.Tensor) -> tf.Tensor:
        ids = tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32)
        parts = []
        if cfg.add_bos:
            parts.append(tf.constant([tok.bos_id], tf.int32))
        parts.append(ids)
        if cfg.add_eos:
            parts.append(tf.constant([tok.eos_id], tf.int32))
        return tf.concat(parts, axis=0)

    return fn


def _row_features(tokens: tf.Tensor, doc_ids: tf.Tensor) -> dict[str, tf.Tensor]:
    """Segment ids 1..k and positions that restart at each document start within the row."""
    segments = tf.cast(doc_ids - doc_ids[0], tf.int32)  # contiguous and sorted: 0..k-1
    index = tf.range(tf.shape(tokens)[0], dtype=tf.int32)
    starts = tf.math.segment_min(index, segments)
    positions = index - tf.gather(starts, segments)
    return {"tokens": tokens, "segment_ids": segments + 1, "positions": positions}


def pack(token_ds: tf.data.Dataset, seq_len: int) -> tf.data.Dataset:
    """Concatenates tokenized documents and cuts rows of exactly seq_len tokens."""
    tagged = token_ds.enumerate().map(
        lambda i, toks: (toks, tf.fill(tf.shape(toks), i)), num_parallel_calls=tf.data.AUTOTUNE
    )
    rows = tagged.unbatch().batch(seq_len, drop_remainder=True)
    return rows.map(_row_features, num_parallel_calls=tf.data.AUTOTUNE)


def _local_batch_size(cfg: DataConfig, process_count: int) -> int:
    if cfg.global_batch_size % process_count:
        raise ConfigError(
            f"data.global_batch_size={cfg.global_batch_size} is not divisible by the "
            f"{process_count} processes; each process feeds an equal share"
        )
    return cfg.global_batch_size // process_count


def train_dataset(
    cfg: DataConfig, seed: int, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
    """Endless, shuffled, packed batches of this process's share of the train split."""
    files = resolve_files(cfg, "train")
    if len(files) < process_count:
        raise ConfigError(
            f"the train split has {len(files)} files but {process_count} processes read it, "
            "each a disjoint share of the files; split the corpus into more files"
        )
    local_batch = _local_batch_size(cfg, process_count)
    ds = tf.data.Dataset.from_tensor_slices(files).shard(process_count, process_index)
    # Shuffle file order anew each epoch; the order is a function of the seed alone.
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = _documents(ds).map(_tokenize(cfg), num_parallel_calls=tf.data.AUTOTUNE)
    ds = pack(ds, cfg.seq_len)
    if cfg.shuffle_buffer > 1:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    # The JSON parser is a pure numpy_function; its absence of state is safe to ignore when the
    # iterator is checkpointed.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_batches(cfg: DataConfig, process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """The fixed eval set: the first `eval_batches` global batches of the eval split, in order.

    Every process packs the whole (small) eval split and keeps its rows of each global batch.
    """
    files = resolve_files(cfg, "eval")
    local_batch = _local_batch_size(cfg, process_count)
    ds = _documents(tf.data.Dataset.from_tensor_slices(files)).map(_tokenize(cfg))
    ds = pack(ds, cfg.seq_len).batch(cfg.global_batch_size, drop_remainder=True)
    batches = []
    lo, hi = process_index * local_batch, (process_index + 1) * local_batch
    for batch in ds.take(cfg.eval_batches).as_numpy_iterator():
        batches.append({k: v[lo:hi] for k, v in batch.items()})
    if not batches:
        raise ConfigError(
            f"the eval split ({len(files)} files) has fewer than seq_len x global_batch_size = "
            f"{cfg.seq_len * cfg.global_batch_size} tokens; add eval data or shrink the batch"
        )
    return batches


class DataIterator:
    """A checkpointable iterator of numpy batches over a tf.data dataset."""

    def __init__(self, ds: tf.data.Dataset):
        self._iterator = iter(ds)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        return {k: v.numpy() for k, v in next(self._iterator).items()}

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the iterator position under directory (a file prefix per process)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._checkpoint.write(os.path.join(directory, "iterator"))

    def restore(self, directory: str | os.PathLike) -> None:
        self._checkpoint.read(os.path.join(directory, "iterator")).assert_consumed()
