"""Streaming safetensors: a lazy, memory-mapped view of (sharded) checkpoint files, and a writer
of sharded files with their index, one tensor in memory at a time.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw bytes. Reading parses the headers only; each tensor is read
from its file when indexed (into memory of its own, freed when dropped: no mapping keeps the
file's pages in the process), and bfloat16 stays bfloat16 (ml_dtypes). Writing sends each tensor
to disk as it arrives.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from flaxlm.config import ConfigError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX = "model.safetensors.index.json"
_COPY_CHUNK = 16 * 2**20  # bytes per read while a shard's data is copied behind its header


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        # A damaged file can claim any length: never read more than the file holds.
        if size > path.stat().st_size - 8:
            raise ValueError(f"its header claims {size} bytes, more than the file holds")
        return json.loads(f.read(size)), 8 + size


class LazySafetensors(Mapping):
    """name -> NumPy array over every *.safetensors file of a directory; a tensor is read from
    disk each time it is indexed, nothing before."""

    def __init__(self, src: str | Path):
        files = sorted(Path(src).glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{src} has no *.safetensors files (PyTorch .bin files are not read)")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for path in files:
            try:
                header, start = _header(path)
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
            except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
                raise ConfigError(
                    f"cannot read {path} ({type(e).__name__}: {str(e)[:200]}); the file is "
                    "truncated or not safetensors: download it again"
                ) from None
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (path, info, start)

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, start = self._where[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        count = (end - begin) // dtype.itemsize
        array = np.fromfile(path, dtype=dtype, count=count, offset=start + begin)
        return array.reshape(info["shape"])

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:  # from the header, without reading
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._where[name][1]["dtype"]])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class _ShardWriter:
    """One safetensors file written as its tensors arrive, holding none of them: the bytes go
    to a temporary data file at once, and at `close` the header (which comes first and names
    every tensor's offsets, known only at the end) is written ahead of a copy of them."""

    def __init__(self, path: Path):
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 (closed in close)
        self.header: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [self.size, self.size + array.nbytes],
        }
        self._data.write(memoryview(array.reshape(-1).view(np.uint8)))
        self.size += array.nbytes

    def close(self) -> None:
        self._data.close()
        blob = json.dumps({**self.header, "__metadata__": {"format": "pt"}}, separators=(",", ":"))
        blob = blob.encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as f, open(self._data_path, "rb") as data:
            f.write(struct.pack("<Q", len(blob)) + blob)
            shutil.copyfileobj(data, f, _COPY_CHUNK)
        self._data_path.unlink()


def write_sharded(
    tensors: Iterable[tuple[str, np.ndarray]], dst: str | Path, max_shard_bytes: int
) -> list[str]:
    """Writes (name, array) pairs, consumed lazily, as shards of at most max_shard_bytes (a
    larger tensor gets a shard of its own) with `model.safetensors.index.json`; a single shard
    is plain `model.safetensors`. Each tensor goes to disk as it arrives: the host holds one
    tensor at a time, whatever the shard size (the disk holds one shard's bytes twice while it
    is closed)."""
    dst = Path(dst)
    shards: list[_ShardWriter] = []
    total = 0
    for name, array in tensors:
        if not shards or (shards[-1].header and shards[-1].size + array.nbytes > max_shard_bytes):
            if shards:
                shards[-1].close()
            shards.append(_ShardWriter(dst / f"part-{len(shards):05d}.safetensors"))
        shards[-1].add(name, array)
        total += array.nbytes
        del array  # the caller's tensor can go before the next one is made
    if not shards:
        shards.append(_ShardWriter(dst / "part-00000.safetensors"))
    shards[-1].close()
    final = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        final = ["model.safetensors"]
    for shard, new in zip(shards, final, strict=True):
        shard.path.rename(dst / new)
    if len(shards) > 1:
        weight_map = {k: f for shard, f in zip(shards, final, strict=True) for k in shard.header}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / INDEX).write_text(json.dumps(index, indent=2))
    return final
