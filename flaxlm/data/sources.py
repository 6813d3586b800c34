"""Document sources: each turns a config into tf.data datasets of document texts (tf.string).

A source is one of
- `python-docs`: the built-in offline corpus (`flaxlm.data.corpus`);
- `files`: local or `gs://` files by glob, `.txt`, `.jsonl` or TFRecord (`flaxlm.data.files`);
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

import tensorflow as tf

from flaxlm.config import ConfigError, DataConfig
from flaxlm.data.files import Source, file_documents, require_a_document, resolve_files


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
    require_a_document(mine, src.text_field, f"{where} (data shard {shard} of {num_shards})")
    ds = tf.data.Dataset.from_tensor_slices(mine)
    # File order reshuffled each epoch; a function of (seed, shard) alone.
    ds = ds.shuffle(len(mine), seed=seed, reshuffle_each_iteration=True).repeat()
    return file_documents(ds, src.text_field)


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
