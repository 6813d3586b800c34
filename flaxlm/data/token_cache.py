"""The token cache: a config's train split tokenized once, then read by row index.

`flaxlm data tokenize --config C` writes `data.token_cache` (a local or `gs://` directory):

- `source_<i>.tokens`: component i's documents tokenized (BOS/EOS as configured) end to end,
  raw little-endian uint16 (vocabularies up to 65,536 ids) or uint32;
- `source_<i>.starts`: raw int64, the offset of every document's first token;
- `meta.json`, written last (its presence marks a complete cache): the tokenizer, BOS/EOS,
  and per component its name and token and document counts.

A component of T tokens holds T // seq_len rows; row r is tokens [r*L, (r+1)*L), with the
segment ids and positions of `flaxlm.data.packing` (documents end to end, positions restarting
at each document start and at the row start), so the rows are those the streaming pipeline packs
from the same documents in the same order. Reading a row is two slices (memory-mapped locally,
ranged reads on an object store), which makes an index-based, elastic data order possible
(`flaxlm.data.indexed`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from flaxlm import fs
from flaxlm.config import ConfigError, DataConfig, Packing
from flaxlm.data import sources
from flaxlm.data.files import file_documents, resolve_files
from flaxlm.data.tokenize import tokenize_documents
from flaxlm.data.tokenizer import from_config

META = "meta.json"
FORMAT = 1
_ENDIAN = "<"  # files are little-endian on every host


def _tokenizer_key(cfg: DataConfig) -> dict[str, Any]:
    """What the cached ids depend on besides the documents."""
    path = cfg.tokenizer_path
    return {
        "tokenizer": str(cfg.tokenizer),
        "tokenizer_path": os.fspath(fs.as_path(path)) if path else None,
        "add_bos": cfg.add_bos,
        "add_eos": cfg.add_eos,
    }


def _train_documents(src: sources.Source, cache_dir: str, where: str) -> tf.data.Dataset:
    """The texts of a source's whole train split, once, in a fixed order (sorted files)."""
    if src.corpus == "tfds":
        return sources.tfds_documents(src, src.train_split, 0, 1, None, where)
    files = resolve_files(src, cache_dir, "train", where)
    return file_documents(tf.data.Dataset.from_tensor_slices(files), src.text_field)


def build(cfg: DataConfig, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Tokenizes the train split of every component of cfg into cfg.token_cache."""
    if not cfg.token_cache:
        raise ConfigError(
            "flaxlm data tokenize writes data.token_cache: set it (data.token_cache=DIR)"
        )
    root = fs.as_path(cfg.token_cache)
    if (root / META).exists() and not overwrite:
        raise ConfigError(
            f"{root} already holds a token cache; pass --overwrite to rebuild it (runs that "
            "read it can then no longer resume: their data positions count its rows)"
        )
    root.mkdir(parents=True, exist_ok=True)
    if (root / META).exists():
        (root / META).unlink()  # an interrupted rebuild must not look complete
    tok = from_config(cfg)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    on_disk = dtype.newbyteorder(_ENDIAN)
    parts = []
    for i, (src, _, where) in enumerate(sources.components(cfg)):
        started = time.perf_counter()
        docs = _train_documents(src, cfg.cache_dir, where)
        docs = tokenize_documents(docs, tok, cfg.add_bos, cfg.add_eos, with_bytes=False)
        starts, tokens = [], 0
        with (root / f"source_{i}.tokens").open("wb") as f:
            for doc in docs.as_numpy_iterator():
                starts.append(tokens)
                f.write(doc["ids"].astype(on_disk).tobytes())
                tokens += len(doc["ids"])
        if not starts:
            raise ConfigError(f"{where}: the train split holds no non-empty document")
        (root / f"source_{i}.starts").write_bytes(np.array(starts, _ENDIAN + "i8").tobytes())
        name = getattr(src, "name", None) or f"source_{i}"
        parts.append({"name": name, "tokens": tokens, "documents": len(starts)})
        log(
            f"{where}: {len(starts):,} documents, {tokens:,} tokens "
            f"({time.perf_counter() - started:.1f} s)"
        )
    meta = {"format": FORMAT, "dtype": dtype.name, "sources": parts, **_tokenizer_key(cfg)}
    fs.write_text_atomic(root / META, json.dumps(meta, indent=1) + "\n")
    return meta


class _Array:
    """A raw 1-D little-endian array file, sliced without reading it whole."""

    def __init__(self, path, dtype: np.dtype, length: int):
        self.dtype = np.dtype(dtype).newbyteorder(_ENDIAN)
        self.length = length
        if fs.is_remote(path):
            self._file, self._map = path.open("rb"), None
        else:
            self._file = None
            self._map = np.memmap(os.fspath(path), self.dtype, "r", shape=(length,))

    def __getitem__(self, span: slice) -> np.ndarray:
        start, stop, _ = span.indices(self.length)
        if self._map is not None:
            return np.asarray(self._map[start:stop])
        self._file.seek(start * self.dtype.itemsize)
        data = self._file.read((stop - start) * self.dtype.itemsize)
        return np.frombuffer(data, self.dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._map = None


@dataclass
class _Source:
    tokens: _Array
    starts: np.ndarray  # every document's first token (read whole: 8 bytes per document)


class TokenCache:
    """A token cache opened for reading rows of seq_len tokens."""

    def __init__(self, cfg: DataConfig):
        root = fs.as_path(cfg.token_cache)
        if not (root / META).exists():
            raise ConfigError(
                f"data.token_cache={cfg.token_cache} holds no token cache (no {META}); build it "
                "first: flaxlm data tokenize --config YOUR_CONFIG (with the same data.* settings)"
            )
        meta = json.loads((root / META).read_text())
        expected = _tokenizer_key(cfg)
        differs = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if meta.get("format") != FORMAT or differs:
            raise ConfigError(
                f"the token cache {root} was built with other settings "
                f"({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in differs.items())}"
                "); rebuild it with flaxlm data tokenize --overwrite, or point data.token_cache "
                "at a new directory"
            )
        components = sources.components(cfg)
        if len(meta["sources"]) != len(components):
            raise ConfigError(
                f"the token cache {root} holds {len(meta['sources'])} sources, but the config "
                f"has {len(components)}; rebuild it for this config (flaxlm data tokenize)"
            )
        self.seq_len = cfg.seq_len
        self.tokens_per_source = [part["tokens"] for part in meta["sources"]]
        self.rows_per_source = [n // cfg.seq_len for n in self.tokens_per_source]
        self.packing = cfg.packing
        dtype = np.dtype(meta["dtype"])
        self._sources = []
        for i, part in enumerate(meta["sources"]):
            starts = np.frombuffer((root / f"source_{i}.starts").read_bytes(), _ENDIAN + "i8")
            if len(starts) != part["documents"]:
                raise ConfigError(
                    f"{root}/source_{i}.starts holds {len(starts)} documents, {META} says "
                    f"{part['documents']}: the cache is damaged; rebuild it (flaxlm data tokenize "
                    "--overwrite)"
                )
            tokens = _Array(root / f"source_{i}.tokens", dtype, part["tokens"])
            self._sources.append(_Source(tokens, starts))
        for i, n in enumerate(self.rows_per_source):
            if n == 0:
                raise ConfigError(
                    f"component {i} of the token cache has {self.tokens_per_source[i]} tokens, "
                    f"fewer than one row of data.seq_len={cfg.seq_len}; add data or shorten rows"
                )

    def row(self, source: int, index: int) -> dict[str, np.ndarray]:
        """Row `index` of a component: tokens, segment_ids and positions (int32)."""
        src, n = self._sources[source], self.seq_len
        lo = index * n
        tokens = src.tokens[lo : lo + n].astype(np.int32)
        if self.packing == Packing.concat:
            positions = np.arange(n, dtype=np.int32)
            return {"tokens": tokens, "segment_ids": np.ones(n, np.int32), "positions": positions}
        at = np.arange(lo, lo + n)
        doc = np.searchsorted(src.starts, at, side="right") - 1
        start = np.maximum(src.starts[doc], lo)  # a document started before the row: row start
        return {
            "tokens": tokens,
            "segment_ids": (doc - doc[0] + 1).astype(np.int32),
            "positions": (at - start).astype(np.int32),
        }

    def close(self) -> None:
        for src in self._sources:
            src.tokens.close()
