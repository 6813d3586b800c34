"""Corpora: the built-in `python-docs` corpus and the resolution of train / eval file lists.

`python-docs` is real English text that exists offline on every machine with Python: the
reference documentation topics of `pydoc_data` (the text behind `help("if")`) and the docstrings
of the standard library (about 2 MB in all). It is written once, as one `.txt` file per document,
under `data.cache_dir`; one document in twenty (chosen by a hash of its name, so the split never
changes) is held out as the eval split.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

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
