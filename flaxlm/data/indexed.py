"""The index-based data order over a token cache: elastic resume, a data position of bytes.

Every global batch is a pure function of (seed, step, a few counters), computed identically
on every process, so the position is the same whatever the number of processes:

- a component of n rows is read in epochs; epoch e visits its rows in the order of a seeded
  pseudo-random permutation of [0, n) (`permute`: a Feistel network with cycle walking, O(1)
  memory and random access, so a billion-row corpus needs no index table);
- with a mixture, the component of each of the B rows of batch s is drawn from the weights by a
  generator seeded with (seed, s); the k-th row a component gives is row permute(k mod n,
  epoch k // n) of it;
- process p of P reads rows [p*B/P, (p+1)*B/P) of each global batch.

The saved position (`position.json`) is the number of batches drawn and, per component, the
rows consumed: a run saved on P processes resumes on any Q that divides the global batch with
the very batches an uninterrupted run would have read. `flaxlm.data.pipeline.train_iterator`
returns this iterator when `data.token_cache` is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from flaxlm.config import ConfigError, DataConfig
from flaxlm.data import sources
from flaxlm.data.token_cache import TokenCache

POSITION_FILE = "position.json"
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_ROUNDS = 4


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit integer hash of x under key (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """The images of `index` (values in [0, n)) under a pseudo-random permutation of [0, n).

    A balanced Feistel network over the smallest even-bit power of two >= n (at most 4n) is a
    bijection of that range; applying it again to the values that land at or past n (cycle
    walking) restricts it to a bijection of [0, n).
    """
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    keys = [int(_mix(np.uint64(r), key)) for r in range(_ROUNDS)]

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & low
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & low)
        return (left << np.uint64(half)) | right

    x = rounds(np.asarray(index, np.uint64))
    outside = x >= n
    while outside.any():
        x[outside] = rounds(x[outside])
        outside = x >= n
    return x.astype(np.int64)


class IndexedIterator:
    """This process's batches of the index-based order (see the module docstring)."""

    def __init__(self, cfg: DataConfig, seed: int, process_index: int = 0, process_count: int = 1):
        if cfg.global_batch_size % process_count:
            raise ConfigError(
                f"data.global_batch_size={cfg.global_batch_size} is not divisible by the "
                f"{process_count} processes; each process reads an equal share of every batch"
            )
        self.cache = TokenCache(cfg)
        self.seed = seed
        self.batch = cfg.global_batch_size
        local = self.batch // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)
        self.is_writer = process_index == 0
        parts = sources.components(cfg)
        weights = np.array([w for _, w, _ in parts], np.float64)
        self.weights = weights / weights.sum()
        self.step = 0  # batches drawn
        self.consumed = [0] * len(parts)  # rows drawn from each component

    def __iter__(self) -> IndexedIterator:
        return self

    def _sources_of_batch(self, step: int) -> np.ndarray:
        if len(self.weights) == 1:
            return np.zeros(self.batch, np.int64)
        rng = np.random.default_rng([self.seed, step])
        return rng.choice(len(self.weights), size=self.batch, p=self.weights)

    def _row_index(self, source: int, k: np.ndarray) -> np.ndarray:
        n = self.cache.rows_per_source[source]
        epoch, within = np.divmod(k, n)
        out = np.empty_like(k)
        for e in np.unique(epoch):  # at most two epochs in one batch, unless a source is tiny
            at = epoch == e
            key = int(_mix(np.uint64(self.seed), 1_000_003 * source + int(e)))
            out[at] = permute(within[at], n, key)
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        which = self._sources_of_batch(self.step)
        k = np.empty(self.batch, np.int64)  # each row's place in its component's stream
        for i in range(len(self.weights)):
            at = which == i
            k[at] = self.consumed[i] + np.arange(int(at.sum()))
            self.consumed[i] += int(at.sum())
        self.step += 1
        mine, k = which[self.rows], k[self.rows]
        index = np.empty_like(k)
        for i in np.unique(mine):
            at = mine == i
            index[at] = self._row_index(int(i), k[at])
        out = [self.cache.row(int(s), int(r)) for s, r in zip(mine, index, strict=True)]
        return {key: np.stack([r[key] for r in out]) for key in out[0]}

    def position(self) -> dict[str, Any]:
        return {
            "batches": self.step,
            "rows_consumed": list(self.consumed),
            "seq_len": self.cache.seq_len,
            "source_tokens": self.cache.tokens_per_source,
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Writes position.json (process 0: the position is the same on every process)."""
        if self.is_writer:
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / POSITION_FILE).write_text(json.dumps(self.position()) + "\n")

    def restore(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / POSITION_FILE
        if not path.is_file():
            raise ConfigError(
                f"{directory} holds no token-cache data position ({POSITION_FILE}): the "
                "checkpoint was written by the streaming pipeline; resume it without "
                "data.token_cache, or start a new train.run_dir"
            )
        saved = json.loads(path.read_text())
        here = self.position()
        for key, what in (("seq_len", "data.seq_len"), ("source_tokens", "the cache's tokens")):
            if saved[key] != here[key]:
                raise ConfigError(
                    f"the data position in {directory} counts rows with {what} = "
                    f"{saved[key]}, this run has {here[key]}; resume with the settings and "
                    "token cache it was written with, or start a new train.run_dir"
                )
        self.step = int(saved["batches"])
        self.consumed = [int(c) for c in saved["rows_consumed"]]

    def close(self) -> None:
        self.cache.close()
