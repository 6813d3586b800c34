"""Tokenizers: bytes, SentencePiece models, and Hugging Face `tokenizer.json` files.

Byte ids are the byte values themselves (0..255), so tokenization is a reinterpretation of the
UTF-8 bytes and runs inside the tf.data graph (`tf.io.decode_raw`). SentencePiece and Hugging
Face tokenizers run in the pipeline's parallel map workers on batches of documents, through their
libraries' (multi-threaded) batch encoders (`flaxlm.data.tokenize`). Every model vocabulary is at
least `vocab_size` wide; models usually pad it to a multiple of 64 for fast matmuls. Imported
models (`flaxlm convert from-hf`) bring their own tokenizer, used for prompts and outputs.

Besides ids, the library tokenizers' `encode_with_bytes` gives how many bytes of the UTF-8 text
each token stands for (0 for BOS/EOS; byte ids stand for one byte each), so that bits per byte
count bytes of text whatever the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaxlm.config import BYTE_VOCAB_SIZE, ConfigError, DataConfig


class ByteTokenizer:
    """Bytes 0..255 are their own ids; BOS, EOS and PAD follow."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes byte ids; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (GPT-2 BPE, Llama 3 tiktoken-style BPE, ...).

    `encode(text, add_bos=True)` applies the tokenizer's own post-processor, so BOS is added
    exactly when the model family expects it (Llama: yes, GPT-2: no); add_bos=False gives the
    bare tokens of the text.
    """

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.directory = directory
        try:
            self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
            self.vocab_size = self._tok.get_vocab_size()
            self.eos_id = self._special_id(directory, "eos")
            self.bos_id = self._special_id(directory, "bos")
        except Exception as e:  # tokenizers raises bare Exceptions for unreadable files
            raise ConfigError(
                f"cannot read the Hugging Face tokenizer in {directory} ({_first_line(e)}); the "
                "tokenizer.json (or its tokenizer_config.json / generation_config.json) is "
                "truncated or corrupt: copy it again from the model directory"
            ) from None
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

    def encode_with_bytes(
        self, texts: Sequence[bytes], add_bos: bool, add_eos: bool, with_bytes: bool = True
    ):
        """Batch-encodes UTF-8 texts (the library encodes the batch on all cores)."""
        strings = [t.decode("utf-8", errors="replace") for t in texts]
        if not with_bytes:  # training needs ids alone: the fast path, no offsets
            ids = self._tok.encode_batch_fast(strings, add_special_tokens=False)
            ids = [e.ids for e in ids]
            return with_specials(ids, [[0] * len(i) for i in ids], self, add_bos, add_eos)
        encodings = self._tok.encode_batch(strings, add_special_tokens=False)
        ids, nbytes = [], []
        for text, enc in zip(strings, encodings, strict=True):
            ids.append(enc.ids)
            nbytes.append(_bytes_per_token(text, [end for _, end in enc.offsets]))
        return with_specials(ids, nbytes, self, add_bos, add_eos)


class SentencePieceTokenizer:
    """A SentencePiece model file (`.model`), for example one trained by
    `flaxlm tokenizer train`. BOS/EOS are the model's own ids (`bos_id`, `eos_id`)."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.path = Path(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError for a bad model
            raise ConfigError(
                f"cannot read the SentencePiece model {model_file} ({_first_line(e)}); the file "
                "is truncated or not a SentencePiece .model: train one again with `flaxlm "
                "tokenizer train` or point data.tokenizer_path at the right file"
            ) from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return (
            ([self.bos_id] if add_bos and self.bos_id is not None else [])
            + ids
            + ([self.eos_id] if add_eos and self.eos_id is not None else [])
        )

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id, self.pad_id)]
        return self._sp.decode(keep)

    def encode_with_bytes(
        self, texts: Sequence[bytes], add_bos: bool, add_eos: bool, with_bytes: bool = True
    ):
        """Batch-encodes UTF-8 texts; SentencePiece's batch encoder uses all cores."""
        strings = [t.decode("utf-8", errors="replace") for t in texts]
        if not with_bytes:  # training needs ids alone: no per-piece offsets
            ids = self._sp.encode(strings, num_threads=-1)
            return with_specials(ids, [[0] * len(i) for i in ids], self, add_bos, add_eos)
        protos = self._sp.encode(strings, return_type="proto", num_threads=-1)
        ids, nbytes = [], []
        for text, proto in zip(strings, protos, strict=True):
            ids.append([p.id for p in proto.pieces])
            # `end` is a byte offset into the UTF-8 text of this piece's end.
            ends = [p.end for p in proto.pieces]
            nbytes.append(_byte_ends_to_counts(ends, len(text.encode("utf-8"))))
        return with_specials(ids, nbytes, self, add_bos, add_eos)


Tokenizer = ByteTokenizer | HFTokenizer | SentencePieceTokenizer


def _byte_ends_to_counts(ends: list[int], total: int) -> list[int]:
    """Bytes per token from each token's end offset: the sum is exactly the text's bytes.

    Tokens that overlap (a multi-byte character split over byte-level tokens) or whose offsets
    are not increasing get 0 bytes; the last token takes the rest of the text.
    """
    counts, covered = [], 0
    for end in ends:
        end = min(max(end, covered), total)
        counts.append(end - covered)
        covered = end
    if counts:
        counts[-1] += total - covered
    return counts


def _bytes_per_token(text: str, char_ends: list[int]) -> list[int]:
    """Character end offsets -> bytes of UTF-8 text per token."""
    if text.isascii():
        return _byte_ends_to_counts(char_ends, len(text))
    cumulative = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
    byte_ends = [int(cumulative[min(e, len(text))]) for e in char_ends]
    return _byte_ends_to_counts(byte_ends, int(cumulative[-1]))


def with_specials(ids, nbytes, tok, add_bos: bool, add_eos: bool):
    """Adds BOS/EOS (0 bytes each) to every document when the config asks for them."""
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    eos = [tok.eos_id] if add_eos and tok.eos_id is not None else []
    zb, ze = [0] * len(bos), [0] * len(eos)
    return [bos + i + eos for i in ids], [zb + b + ze for b in nbytes]


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def from_config(cfg: DataConfig) -> Tokenizer:
    """The data pipeline's tokenizer from `data.tokenizer` and `data.tokenizer_path`, checked
    against nothing but its own files."""
    kind, path = cfg.tokenizer, cfg.tokenizer_path
    if kind == "byte":
        return ByteTokenizer()
    if not path:
        raise ConfigError(f"data.tokenizer={kind} needs data.tokenizer_path")
    p = Path(path).expanduser()
    if kind == "sentencepiece":
        if not p.is_file():
            raise ConfigError(
                f"data.tokenizer_path={path}: no SentencePiece model file there; train one with "
                "`flaxlm tokenizer train --config C --vocab-size N --output DIR`"
            )
        return SentencePieceTokenizer(p)
    if kind == "hf":
        directory = p.parent if p.name == "tokenizer.json" else p
        if not (directory / "tokenizer.json").is_file():
            raise ConfigError(
                f"data.tokenizer_path={path}: no tokenizer.json there (give the file or its "
                "directory, for example a Hugging Face model directory)"
            )
        return HFTokenizer(directory)
    raise ConfigError(f"data.tokenizer={kind!r} is not one of byte, sentencepiece, hf")


SENTENCEPIECE_FILE = "sentencepiece.model"
