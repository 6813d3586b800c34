"""The tokenization stage of the pipeline: document texts -> (ids, bytes per id) per document.

Documents are batched (DOC_BATCH at a time) and each batch is encoded in one call: in the
tf.data graph for bytes (`tf.io.decode_raw`), or with the tokenizer library's batch encoder for
SentencePiece and Hugging Face tokenizers (multi-threaded C++/Rust) inside `tf.numpy_function`,
under a `map(num_parallel_calls=AUTOTUNE)`, so several batches encode at once. Output order is
deterministic either way.

Bad documents never stop a run: empty documents are dropped and invalid UTF-8 is decoded with
U+FFFD replacements (the byte tokenizer keeps the raw bytes); both are counted in `STATS`
(per process, since start) for the logs.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import tensorflow as tf

from flaxlm.data.tokenizer import ByteTokenizer, Tokenizer

DOC_BATCH = 64

STATS: collections.Counter[str] = collections.Counter()
_STATS_LOCK = threading.Lock()


def _observe(texts: np.ndarray) -> np.ndarray:
    """Counts documents, empty ones and ones with invalid UTF-8 (a side effect for the logs)."""
    empty = invalid = 0
    for t in texts:
        if not t:
            empty += 1
            continue
        try:
            t.decode("utf-8")
        except UnicodeDecodeError:
            invalid += 1
    with _STATS_LOCK:
        STATS["documents"] += len(texts)
        STATS["empty_documents"] += empty
        STATS["invalid_utf8_documents"] += invalid
    return np.int64(len(texts))


def _byte_encode(texts: tf.Tensor, add_bos: bool, add_eos: bool):
    tok = ByteTokenizer
    lengths = tf.strings.length(texts)
    width = tf.maximum(tf.reduce_max(lengths), 1)
    # decode_raw pads each text to `width` bytes; the lengths cut the padding off again.
    padded = tf.io.decode_raw(texts, tf.uint8, fixed_length=width)
    ids = tf.RaggedTensor.from_tensor(tf.cast(padded, tf.int32), lengths=lengths)
    nbytes = tf.ones_like(ids)
    n = tf.shape(texts)[0]
    parts, byte_parts = [ids], [nbytes]
    if add_bos:
        parts.insert(0, tf.fill([n, 1], tok.bos_id))
        byte_parts.insert(0, tf.zeros([n, 1], tf.int32))
    if add_eos:
        parts.append(tf.fill([n, 1], tok.eos_id))
        byte_parts.append(tf.zeros([n, 1], tf.int32))
    return tf.concat(parts, axis=1), tf.concat(byte_parts, axis=1)


def _library_encode(tok: Tokenizer, add_bos: bool, add_eos: bool, with_bytes: bool):
    def encode(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, nbytes = tok.encode_with_bytes(list(texts), add_bos, add_eos, with_bytes)
        lengths = np.array([len(i) for i in ids], np.int64)
        flat = np.fromiter((i for doc in ids for i in doc), np.int32, int(lengths.sum()))
        flat_bytes = np.fromiter((b for doc in nbytes for b in doc), np.int32, int(lengths.sum()))
        return flat, flat_bytes, lengths

    def fn(texts: tf.Tensor):
        flat, flat_bytes, lengths = tf.numpy_function(
            encode, [texts], (tf.int32, tf.int32, tf.int64), stateful=False
        )
        flat.set_shape([None])
        flat_bytes.set_shape([None])
        lengths.set_shape([None])
        ids = tf.RaggedTensor.from_row_lengths(flat, lengths)
        return ids, tf.RaggedTensor.from_row_lengths(flat_bytes, lengths)

    return fn


def tokenize_documents(
    docs: tf.data.Dataset, tok: Tokenizer, add_bos: bool, add_eos: bool, with_bytes: bool = True
) -> tf.data.Dataset:
    """Texts -> {"ids", "bytes"} per non-empty document, in order.

    with_bytes=False (training) skips the bytes-per-token accounting of library tokenizers
    (their "bytes" are then 0): only evaluation needs it.
    """
    if isinstance(tok, ByteTokenizer):

        def encode(texts):
            return _byte_encode(texts, add_bos, add_eos)
    else:
        encode = _library_encode(tok, add_bos, add_eos, with_bytes)

    def stage(texts: tf.Tensor):
        # Stateful: a side effect (the counts) that graph optimisations must not prune.
        seen = tf.numpy_function(_observe, [texts], tf.int64, stateful=True)
        with tf.control_dependencies([seen]):
            texts = tf.boolean_mask(texts, tf.strings.length(texts) > 0)
        ids, nbytes = encode(texts)
        return {"ids": ids, "bytes": nbytes}

    ds = docs.batch(DOC_BATCH).map(stage, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.unbatch()
