"""Paths of run directories, checkpoints and outputs on any file system: local or object store.

Every read and write of a run directory goes through `as_path`, an etils `epath.Path` (the path
type Orbax uses), so `train.run_dir=gs://bucket/run` works like a local directory. Local paths
come back absolute with `~` and environment variables expanded; object-store URLs
(`gs://`, `s3://`, ...) come back as URLs.

Libraries that only read local files (tokenizers, SentencePiece, TensorFlow's checkpoint of the
data position, TensorBoard) get a local copy: `local_copy` downloads, `upload_tree` uploads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etils import epath

# epath reaches gs:// through gcsfs (flaxlm/__init__.py sets EPATH_USE_TF=false); Orbax's array
# files go through TensorStore's own GCS driver.
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")

PathLike = str | os.PathLike


def expand(path: PathLike) -> str:
    """path with `~` and `$VAR` / `${VAR}` expanded (URLs too: `gs://$BUCKET/run`)."""
    return os.path.expanduser(os.path.expandvars(os.fspath(path)))


def is_remote(path: PathLike) -> bool:
    """True for an object-store URL such as `gs://bucket/run`."""
    return expand(path).startswith(REMOTE_PREFIXES)


def as_path(path: PathLike) -> epath.Path:
    """The one path type of run directories: expanded, absolute when local."""
    text = expand(path)
    if text.startswith(REMOTE_PREFIXES):
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copies one file between any two file systems (a no-op when src is dst)."""
    src, dst = as_path(src), as_path(dst)
    if os.fspath(src) == os.fspath(dst):
        return
    dst.write_bytes(src.read_bytes())


def write_text_atomic(path: PathLike, text: str) -> None:
    """Writes a whole small file so that readers see the old or the new content, never a part:
    a temporary file renamed over it locally; one object write on an object store (where a
    write is already all or nothing)."""
    target = as_path(path)
    if is_remote(target):
        target.write_text(text)
        return
    local = Path(os.fspath(target))
    tmp = local.with_name(local.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, local)


def upload_tree(src: Path, dst: PathLike) -> None:
    """Copies the local directory tree src into dst (any file system)."""
    dst = as_path(dst)
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else dst / rel
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            (target / name).write_bytes((Path(root) / name).read_bytes())


def download_tree(src: PathLike, dst: Path) -> None:
    """Copies the directory tree src (any file system) into the local directory dst."""
    src = as_path(src)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            download_tree(child, dst / child.name)
        else:
            (dst / child.name).write_bytes(child.read_bytes())


def local_copy(path: PathLike) -> Path:
    """A local path holding path's file or directory: path itself when local, else a download
    into a new temporary directory."""
    p = as_path(path)
    if not is_remote(p):
        return Path(os.fspath(p))
    local = Path(tempfile.mkdtemp(prefix="flaxlm-")) / p.name
    if p.is_dir():
        download_tree(p, local)
    else:
        local.write_bytes(p.read_bytes())
    return local


@contextlib.contextmanager
def staged(directory: PathLike) -> Iterator[Path]:
    """Yields a local directory whose files end up in directory: directory itself when local,
    else a temporary one uploaded on leaving (for writers of local files only: matplotlib,
    safetensors)."""
    target = as_path(directory)
    if not is_remote(target):
        Path(os.fspath(target)).mkdir(parents=True, exist_ok=True)
        yield Path(os.fspath(target))
        return
    local = Path(tempfile.mkdtemp(prefix="flaxlm-out-"))
    try:
        yield local
        upload_tree(local, target)
    finally:
        shutil.rmtree(local, ignore_errors=True)
