"""Corpora: the built-in `python-docs` corpus and the resolution of train / eval file lists.

`python-docs` is real English text that exists offline on every machine with Python: the
reference documentation topics of `pydoc_data` (the text behind `help("if")`) and the docstrings
of the standard library (about 2 MB in all). It is written once, as one `.txt` file per document,
under `data.cache_dir`; one document in twenty (chosen by a hash of its name, so the split never
changes) is held out as the eval split.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from flaxlm.config import ConfigError, DataConfig

PYTHON_DOCS_VERSION = "python-docs-v1"
# Parts of the standard library that are tests, demos or vendored code rather than documentation.
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def _module_docs(stdlib: Path) -> dict[str, str]:
    docs = {}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                # Very short docstrings ("Return x.") are noise for a language model.
                if text and len(text) > 40:
                    parts.append(text)
        if parts:
            name = ".".join(rel.with_suffix("").parts)
            docs[f"module-{name}"] = "\n\n".join(parts)
    return docs


def python_docs_documents() -> dict[str, str]:
    """Name -> text of every document of the python-docs corpus."""
    from pydoc_data.topics import topics

    docs = {f"topic-{name}": text for name, text in topics.items() if text.strip()}
    docs.update(_module_docs(Path(sysconfig.get_paths()["stdlib"])))
    return docs


def is_eval_document(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 20 == 0


def build_python_docs(cache_dir: str | os.PathLike) -> Path:
    """Writes the corpus under cache_dir (once) and returns its directory.

    The corpus is written to a temporary directory and renamed into place, so that processes
    building it at the same time (several hosts on one machine) never see a partial corpus.
    """
    root = Path(cache_dir).expanduser() / PYTHON_DOCS_VERSION
    if (root / "COMPLETE").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root.parent))
    try:
        for split in ("train", "eval"):
            (tmp / split).mkdir()
        for name, text in sorted(python_docs_documents().items()):
            split = "eval" if is_eval_document(name) else "train"
            (tmp / split / f"{name}.txt").write_text(text, encoding="utf-8")
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            tmp.rename(root)
        except OSError:
            # Another process finished first; its corpus is identical.
            if not (root / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_files(cfg: DataConfig, split: str) -> list[str]:
    """The sorted list of files of a split; fails early, naming the key and the pattern."""
    if cfg.corpus == "python-docs":
        root = build_python_docs(cfg.cache_dir)
        pattern, key = str(root / split / "*.txt"), f"data.cache_dir={cfg.cache_dir}"
    else:
        pattern = cfg.train_files if split == "train" else cfg.eval_files
        key = f"data.{split}_files={pattern}"
        if not pattern:
            raise ConfigError(f"data.{split}_files is not set; give a glob of .txt or .jsonl files")
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise ConfigError(f"{key}: no files match {pattern!r}")
    unsupported = [f for f in files if not f.endswith((".txt", ".jsonl"))]
    if unsupported:
        raise ConfigError(
            f"{key}: {unsupported[0]!r} is neither .txt (one document per file) nor .jsonl "
            "(one JSON object with a 'text' field per line)"
        )
    for path in (f for f in files if f.endswith(".jsonl")):
        _check_jsonl(path, key)
    empty = [f for f in files if os.path.getsize(f) == 0]
    if len(empty) == len(files):
        raise ConfigError(f"{key}: every matching file is empty ({len(files)} files)")
    return files


def _check_jsonl(path: str, key: str) -> None:
    """The first record of a JSON-lines file must carry its text in a string "text" field."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ConfigError(f"{key}: {path} line {number} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(
                    f"{key}: {path} line {number} has no string field 'text' (it has {fields}); "
                    'each line must be an object like {"text": "..."}'
                )
            return
