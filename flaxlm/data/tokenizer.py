"""The byte-level tokenizer: one id per UTF-8 byte, plus BOS, EOS and PAD.

Byte ids are the byte values themselves (0..255), so tokenization is a reinterpretation of the
UTF-8 bytes and runs inside the tf.data graph (`tf.io.decode_raw`). Every model vocabulary is at
least `vocab_size` wide; models usually pad it to a multiple of 64 for fast matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ByteTokenizer:
    """Bytes 0..255 are their own ids; BOS, EOS and PAD follow."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes byte ids; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    @staticmethod
    def is_byte(ids: np.ndarray) -> np.ndarray:
        """True where an id stands for one byte of text (for bits-per-byte accounting)."""
        return ids < 256
