"""Tokenizers: bytes (the training pipeline's), and Hugging Face `tokenizer.json` files.

Byte ids are the byte values themselves (0..255), so tokenization is a reinterpretation of the
UTF-8 bytes and runs inside the tf.data graph (`tf.io.decode_raw`). Every model vocabulary is at
least `vocab_size` wide; models usually pad it to a multiple of 64 for fast matmuls. Imported
models (`flaxlm convert from-hf`) bring their own tokenizer, used for prompts and outputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

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


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (GPT-2 BPE, Llama 3 tiktoken-style BPE, ...).

    `encode(text, add_bos=True)` applies the tokenizer's own post-processor, so BOS is added
    exactly when the model family expects it (Llama: yes, GPT-2: no); add_bos=False gives the
    bare tokens of the text.
    """

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = self._special_id(directory, "eos")
        self.bos_id = self._special_id(directory, "bos")
        self.pad_id = 0  # padding is never attended to; any id will do

    def _special_id(self, directory: Path, which: str) -> int | None:
        # The generation config says which id ends generation; the tokenizer config names it.
        path = directory / "generation_config.json"
        if path.is_file():
            value = json.loads(path.read_text()).get(f"{which}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        path = directory / "tokenizer_config.json"
        if path.is_file():
            token = json.loads(path.read_text()).get(f"{which}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token is not None:
                return self._tok.token_to_id(token)
        return None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # add_bos applies the tokenizer's own special tokens (Llama's BOS; nothing for GPT-2).
        ids = self._tok.encode(text, add_special_tokens=add_bos).ids
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(run_dir: str | Path) -> ByteTokenizer | HFTokenizer:
    """The run's tokenizer: its `tokenizer/tokenizer.json` if it has one, else bytes."""
    directory = Path(run_dir) / "tokenizer"
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory)
    return ByteTokenizer()
