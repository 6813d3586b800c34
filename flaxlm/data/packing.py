"""Packing tokenized documents into fixed-length rows.

`documents` packing concatenates documents end to end and cuts rows of exactly `seq_len` tokens.
Every row carries `segment_ids` (1, 2, ... per document within the row) and `positions`
(restarting at 0 where a document starts, and at the start of each row), so that the model never
attends across documents. A document longer than a row continues in the next row (its positions
count again from 0 there): nothing is dropped but the incomplete last row of a finite stream.

`concat` packing is plain concatenate-and-chunk: one segment per row, positions 0..seq_len-1,
attention across document boundaries (the GPT-2 recipe).

Rows never hold padding (`padding_fraction` measures it in any batch: 0 for both modes).
Eval rows also carry `bytes`: how many bytes of text each token stands for.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def _row_features(tokens: tf.Tensor, doc_ids: tf.Tensor) -> dict[str, tf.Tensor]:
    """Segment ids 1..k and positions that restart at each document start within the row."""
    segments = tf.cast(doc_ids - doc_ids[0], tf.int32)  # contiguous and sorted: 0..k-1
    index = tf.range(tf.shape(tokens)[0], dtype=tf.int32)
    starts = tf.math.segment_min(index, segments)
    positions = index - tf.gather(starts, segments)
    return {"tokens": tokens, "segment_ids": segments + 1, "positions": positions}


def pack_documents(
    docs: tf.data.Dataset, seq_len: int, mode: str = "documents", with_bytes: bool = False
) -> tf.data.Dataset:
    """{"ids", "bytes"} per document (or bare id vectors) -> rows of exactly seq_len tokens."""
    if not isinstance(docs.element_spec, dict):
        docs = docs.map(lambda ids: {"ids": ids, "bytes": tf.ones_like(ids)})

    def tag(i, doc):
        return doc["ids"], tf.fill(tf.shape(doc["ids"]), i), doc["bytes"]

    tagged = docs.enumerate().map(tag, num_parallel_calls=tf.data.AUTOTUNE)
    rows = tagged.unbatch().batch(seq_len, drop_remainder=True)

    def features(tokens, doc_ids, nbytes):
        if mode == "concat":
            out = {
                "tokens": tokens,
                "segment_ids": tf.ones_like(tokens),
                "positions": tf.range(seq_len, dtype=tf.int32),
            }
        else:
            out = _row_features(tokens, doc_ids)
        if with_bytes:
            out["bytes"] = nbytes
        return out

    return rows.map(features, num_parallel_calls=tf.data.AUTOTUNE)


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    """The share of a batch's token slots that hold padding (segment id 0)."""
    return float(np.mean(batch["segment_ids"] == 0))
