"""Document files: finding a split's files by glob and reading their texts as tf.data.

Three formats are read: `.txt` (one document per file), `.jsonl` (one JSON object per line, text
in `text_field`) and TFRecord (`.tfrecord`/`.tfrecords`, `tf.train.Example`s with a bytes feature
`text_field`). Patterns are local globs (`**` recurses) or object-store URLs (`gs://...`). Errors
are raised when a split is resolved, before its pipeline is built, and name the config key, the
pattern and what is wrong. `flaxlm.data.sources` and `flaxlm.data.tfds_builder` read files
through this module.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from typing import Protocol

import tensorflow as tf

from flaxlm.config import ConfigError
from flaxlm.data.corpus import build_python_docs

TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
TEXT_SUFFIXES = (".txt", ".jsonl")
_UTF8_CHECK_BYTES = 1 << 20  # how much of each JSON-lines file is checked to be UTF-8


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


def _check_utf8(path: str, key: str) -> None:
    """The head of a text file must be UTF-8: JSON in another encoding (Latin-1, UTF-16) would
    otherwise be read as mangled or empty documents."""
    with tf.io.gfile.GFile(path, "rb") as f:
        head = f.read(_UTF8_CHECK_BYTES)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{key}: {path} is not UTF-8 text (byte {head[e.start]:#04x} at offset {e.start}); "
            "convert it, for example `iconv -f latin1 -t utf-8 IN > OUT`"
        ) from None


def _check_jsonl(path: str, key: str, field: str) -> None:
    """The first record of a JSON-lines file must carry its text in a string field."""
    _check_utf8(path, key)
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
            # Bytes past the checked head that are not UTF-8 are replaced (and counted), not
            # dropped with the whole document.
            text = json.loads(raw.decode("utf-8", errors="replace")).get(field, "")
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


def require_a_document(files: list[str], field: str, where: str) -> None:
    """An endless stream of files without one non-empty document would never yield a row."""
    docs = file_documents(tf.data.Dataset.from_tensor_slices(files), field)
    for _ in docs.filter(lambda t: tf.strings.length(t) > 0).take(1):
        return
    raise ConfigError(
        f"{where}: the {len(files)} files {files[:3]}{'...' if len(files) > 3 else ''} hold no "
        f"non-empty document (every text, or every {field!r} field, is empty)"
    )
