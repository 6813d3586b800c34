"""The tokenization stage of the pipeline: document texts -> (ids, bytes per id) per document.

Documents are batched (DOC_BATCH at a time) and each batch is encoded in one call: for bytes,
their bytes end to end with each document's length (never padded to the longest, so memory
follows the text, whatever one document's length), or with the tokenizer library's batch encoder for
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

from flaxlm.data.tokenizer import ByteTokenizer, Tokenizer, with_specials

DOC_BATCH = 64
# Library tokenizers encode at most this much text per call (long documents in pieces).
CHUNK_BYTES = 1 << 20

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


def _byte_ids(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of all texts end to end (as ids) and each text's length: no padding, so one
    very long document costs its own size, not the batch's count times it."""
    lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
    flat = np.frombuffer(b"".join(texts), np.uint8).astype(np.int32)
    return flat, lengths


def _byte_encode(texts: tf.Tensor, add_bos: bool, add_eos: bool):
    tok = ByteTokenizer
    flat, lengths = tf.numpy_function(_byte_ids, [texts], (tf.int32, tf.int64), stateful=False)
    flat.set_shape([None])
    lengths.set_shape([None])
    ids = tf.RaggedTensor.from_row_lengths(flat, lengths)
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


def _chunks(text: bytes) -> list[bytes]:
    """text cut into pieces of at most about CHUNK_BYTES, before a space where there is one
    (a byte-level BPE or SentencePiece word starts with its space, so the ids barely change)
    and never inside a UTF-8 character."""
    pieces = []
    while len(text) > CHUNK_BYTES:
        cut = text.rfind(b" ", CHUNK_BYTES // 2, CHUNK_BYTES)
        cut = cut if cut > 0 else CHUNK_BYTES
        while cut < len(text) and text[cut] & 0xC0 == 0x80:  # a continuation byte
            cut += 1
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return pieces


def _encode_bounded(tok: Tokenizer, texts, add_bos: bool, add_eos: bool, with_bytes: bool):
    """tok.encode_with_bytes of texts, one call per CHUNK_BYTES of text: the library's
    per-token objects (strings, offsets) never exist for more than that much text at once,
    whatever one document's length."""
    ids: list[list[int]] = [[] for _ in texts]
    nbytes: list[list[int]] = [[] for _ in texts]
    group: list[tuple[int, bytes]] = []

    def flush() -> None:
        got = tok.encode_with_bytes([c for _, c in group], False, False, with_bytes)
        for (doc, _), doc_ids, doc_bytes in zip(group, *got, strict=True):
            ids[doc].extend(doc_ids)
            nbytes[doc].extend(doc_bytes)
        group.clear()

    size = 0
    for doc, text in enumerate(texts):
        for chunk in _chunks(text):
            if group and size + len(chunk) > CHUNK_BYTES:
                flush()
                size = 0
            group.append((doc, chunk))
            size += len(chunk)
    if group:
        flush()
    return with_specials(ids, nbytes, tok, add_bos, add_eos)


def _library_encode(tok: Tokenizer, add_bos: bool, add_eos: bool, with_bytes: bool):
    def encode(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, nbytes = _encode_bounded(tok, list(texts), add_bos, add_eos, with_bytes)
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
