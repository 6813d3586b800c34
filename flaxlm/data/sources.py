"""Document sources: each turns a config into tf.data datasets of document texts (tf.string).

A source is one of
- `python-docs`: the built-in offline corpus (`flaxlm.data.corpus`);
- `files`: local files by glob: `.txt` (one document per file), `.jsonl` (one JSON object per
  line, text in `text_field`) and TFRecord (`.tfrecord`/`.tfrecords`, `tf.train.Example`s with a
  bytes feature `text_field`);
- `tfds`: any TensorFlow Datasets dataset by name (`c4/en`, `lm1b`, `wikipedia/...`,
  `tiny_shakespeare`, or a local corpus built with `flaxlm.data.tfds_builder`), prepared under
  `tfds_data_dir` (local or `gs://`); nothing is downloaded;
- `mixture`: several of the above, sampled document by document with the given weights.

For training, the data are cut into V disjoint *data shards*: shard k of a file source reads
files k, k+V, ... of the sorted list; shard k of a TFDS source reads the k-th of V even
subsplits (`tfds.even_splits`). Each shard is read in an order that is a function of
(seed, k) alone, so the shards do not depend on the number of processes reading them.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Protocol

import tensorflow as tf

from flaxlm.config import ConfigError, DataConfig
from flaxlm.data.corpus import build_python_docs

TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
TEXT_SUFFIXES = (".txt", ".jsonl")


class Source(Protocol):
    """The fields a source reads (DataConfig itself, or one entry of data.mixture)."""

    corpus: str
    train_files: str | None
    eval_files: str | None
    tfds_name: str | None
    tfds_data_dir: str | None
    train_split: str
    eval_split: str
    text_field: str


def _is_tfrecord(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(TFRECORD_SUFFIXES) or ".tfrecord-" in name


def resolve_files(src: Source, cache_dir: str, split: str, where: str = "data") -> list[str]:
    """The sorted file list of a file source's split; fails early, naming the key and pattern."""
    if src.corpus == "python-docs":
        root = build_python_docs(cache_dir)
        pattern, key = os.path.join(root, split, "*.txt"), f"data.cache_dir={cache_dir}"
    else:
        pattern = src.train_files if split == "train" else src.eval_files
        key = f"{where}.{split}_files={pattern}"
        if not pattern:
            raise ConfigError(
                f"{where}.{split}_files is not set; give a glob of .txt, .jsonl or TFRecord files"
            )
    is_remote = "://" in pattern
    files = sorted(tf.io.gfile.glob(pattern) if is_remote else _local_glob(pattern))
    if not files:
        raise ConfigError(f"{key}: no files match {pattern!r}")
    unsupported = [f for f in files if not (f.endswith(TEXT_SUFFIXES) or _is_tfrecord(f))]
    if unsupported:
        raise ConfigError(
            f"{key}: {unsupported[0]!r} is not .txt (one document per file), .jsonl (one JSON "
            f"object with a {src.text_field!r} field per line) or .tfrecord (tf.train.Example "
            f"with a bytes feature {src.text_field!r})"
        )
    for path in files:
        if path.endswith(".jsonl"):
            _check_jsonl(path, key, src.text_field)
        elif _is_tfrecord(path):
            _check_tfrecord(path, key, src.text_field)
    empty = [f for f in files if tf.io.gfile.stat(f).length == 0]
    if len(empty) == len(files):
        raise ConfigError(f"{key}: every matching file is empty ({len(files)} files)")
    return files


def _local_glob(pattern: str) -> list[str]:
    return glob.glob(os.path.expanduser(pattern), recursive=True)


def _check_jsonl(path: str, key: str, field: str) -> None:
    """The first record of a JSON-lines file must carry its text in a string field."""
    with tf.io.gfile.GFile(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ConfigError(f"{key}: {path} line {number} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(
                    f"{key}: {path} line {number} has no string field {field!r} (it has "
                    f'{fields}); each line must be an object like {{"{field}": "..."}} '
                    "(or set data.text_field)"
                )
            return


def _check_tfrecord(path: str, key: str, field: str) -> None:
    for raw in tf.data.TFRecordDataset(path).take(1):
        example = tf.train.Example.FromString(raw.numpy())
        feature = example.features.feature.get(field)
        if feature is None or not feature.bytes_list.value:
            raise ConfigError(
                f"{key}: the first record of {path} has no bytes feature {field!r} (it has "
                f"{sorted(example.features.feature)}); set data.text_field"
            )


def _jsonl_texts(path: tf.Tensor, field: str) -> tf.data.Dataset:
    def parse(raw: bytes) -> bytes:
        try:
            text = json.loads(raw.decode("utf-8")).get(field, "")
        except (ValueError, AttributeError):
            text = ""  # a malformed line is skipped (as an empty document, counted), not fatal
        if not isinstance(text, str):
            text = ""
        return text.encode("utf-8", errors="surrogatepass")

    def parse_line(line: tf.Tensor) -> tf.Tensor:
        text = tf.numpy_function(parse, [line], tf.string, stateful=False)
        return tf.reshape(text, [])

    return tf.data.TextLineDataset(path).map(parse_line)


def _tfrecord_texts(path: tf.Tensor, field: str) -> tf.data.Dataset:
    spec = {field: tf.io.FixedLenFeature([], tf.string, default_value="")}
    return tf.data.TFRecordDataset(path).map(lambda r: tf.io.parse_single_example(r, spec)[field])


def file_documents(file_ds: tf.data.Dataset, field: str = "text") -> tf.data.Dataset:
    """File names -> document texts (.txt: the file; .jsonl: one per line; TFRecord: one per
    record), empty documents included (the tokenizer stage counts and drops them)."""

    def read(path: tf.Tensor) -> tf.data.Dataset:
        is_jsonl = tf.strings.regex_full_match(path, r".*\.jsonl")
        is_tfrecord = tf.strings.regex_full_match(path, r".*\.tfrecords?(-.*)?")
        return tf.case(
            [
                (is_jsonl, lambda: _jsonl_texts(path, field)),
                (is_tfrecord, lambda: _tfrecord_texts(path, field)),
            ],
            default=lambda: tf.data.Dataset.from_tensors(tf.io.read_file(path)),
        )

    return file_ds.flat_map(read)


def _tfds_builder(src: Source, where: str):
    import tensorflow_datasets as tfds

    import flaxlm.data.tfds_builder  # noqa: F401  (registers the local-corpus builder)

    if not src.tfds_name:
        raise ConfigError(f"{where}.corpus=tfds needs {where}.tfds_name (for example lm1b)")
    try:
        return tfds.builder(src.tfds_name, data_dir=src.tfds_data_dir)
    except Exception as e:  # tfds raises several types: not found, bad config, ...
        raise ConfigError(
            f"{where}.tfds_name={src.tfds_name!r} (data_dir {src.tfds_data_dir!r}): {e}"
        ) from e


def tfds_documents(
    src: Source, split: str, shard: int, num_shards: int, seed: int | None, where: str = "data"
) -> tf.data.Dataset:
    """Texts of shard k of V of a TFDS split; file order shuffled with the seed if given."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(src, where)
    try:
        n = builder.info.splits[split].num_examples
    except (KeyError, ValueError):
        n = None  # unknown split sizes (mocked datasets): tfds.load below still checks the split
    if n == 0:
        raise ConfigError(f"{where}.tfds_name={src.tfds_name!r}: split {split!r} is empty")
    subsplit = tfds.even_splits(split, n=num_shards)[shard] if num_shards > 1 else split
    read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=1)
    try:
        ds = builder.as_dataset(
            split=subsplit, shuffle_files=seed is not None, read_config=read_config
        )
    except Exception as e:
        raise ConfigError(
            f"{where}.tfds_name={src.tfds_name!r} split {subsplit!r} cannot be read from "
            f"{src.tfds_data_dir or tfds.core.constants.DATA_DIR!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}); prepare it there first (flaxlm never downloads)"
        ) from e
    field = src.text_field
    if field not in builder.info.features:
        raise ConfigError(
            f"{where}.text_field={field!r}: {src.tfds_name} has features "
            f"{sorted(builder.info.features)}"
        )
    return ds.map(lambda x: x[field])


def shard_documents(
    src: Source, cache_dir: str, seed: int, shard: int, num_shards: int, where: str = "data"
) -> tf.data.Dataset:
    """Endless texts of one training data shard, in an order that depends on (seed, shard)."""
    if src.corpus == "tfds":
        return tfds_documents(src, src.train_split, shard, num_shards, seed, where).repeat()
    files = resolve_files(src, cache_dir, "train", where)
    if len(files) < num_shards:
        raise ConfigError(
            f"the train split of {where} has {len(files)} files but data.num_shards="
            f"{num_shards} data shards read it, each a disjoint share of the files; split the "
            "corpus into more files or lower data.num_shards"
        )
    mine = files[shard::num_shards]
    _require_a_document(mine, src.text_field, f"{where} (data shard {shard} of {num_shards})")
    ds = tf.data.Dataset.from_tensor_slices(mine)
    # File order reshuffled each epoch; a function of (seed, shard) alone.
    ds = ds.shuffle(len(mine), seed=seed, reshuffle_each_iteration=True).repeat()
    return file_documents(ds, src.text_field)


def _require_a_document(files: list[str], field: str, where: str) -> None:
    """An endless stream of files without one non-empty document would never yield a row."""
    docs = file_documents(tf.data.Dataset.from_tensor_slices(files), field)
    for _ in docs.filter(lambda t: tf.strings.length(t) > 0).take(1):
        return
    raise ConfigError(
        f"{where}: the {len(files)} files {files[:3]}{'...' if len(files) > 3 else ''} hold no "
        f"non-empty document (every text, or every {field!r} field, is empty)"
    )


def eval_documents(src: Source, cache_dir: str, where: str = "data") -> tf.data.Dataset:
    """Texts of the whole eval split, in a fixed order."""
    if src.corpus == "tfds":
        return tfds_documents(src, src.eval_split, 0, 1, None, where)
    files = resolve_files(src, cache_dir, "eval", where)
    return file_documents(tf.data.Dataset.from_tensor_slices(files), src.text_field)


def components(cfg: DataConfig) -> list[tuple[Source, float, str]]:
    """(source, weight, key prefix) of each component: one, or the mixture's entries."""
    if cfg.corpus != "mixture":
        return [(cfg, 1.0, "data")]
    return [(m, m.weight, f"data.mixture[{i}]") for i, m in enumerate(cfg.mixture)]
