"""Reporting measurements: progress bars, tables (CSV and JSON) and figures.

The sweeps, the scaling ladder and the evaluation of every checkpoint show their progress and
write their results through these few functions, so that every table has the same shape and
every figure the same settings:

- `progress` is a tqdm bar on stderr (stdout carries the JSON results), shown by the first
  process only; `note` prints a line above it;
- `write_csv` writes rows as CSV with nested dicts flattened into `key.sub` columns, in the order
  they first appear; `write_json` writes an indented JSON document; `write_table` does both;
- `figure` opens a matplotlib figure for a file (no display needed) and saves and closes it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

Row = dict[str, Any]


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    initial: int = 0,
    show: bool = True,
) -> tqdm:
    """A progress bar on stderr, disabled in every process but the first (and where not show)."""
    import jax

    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not show or jax.process_index() != 0,
    )


def note(bar: tqdm, message: str) -> None:
    """Prints message on stderr above the bar, if the bar is shown (the first process)."""
    if not bar.disable:
        bar.write(message, file=sys.stderr)


def flatten(row: Row) -> Row:
    """Nested dicts (a mesh, say) become columns: mesh.data, mesh.fsdp, ..."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """Writes rows (flattened) as CSV; the columns are every key in the order it first appears."""
    flat = [flatten(r) for r in rows]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    return Path(path)


def write_json(value: Any, path: Path) -> Path:
    """Writes value as indented JSON."""
    Path(path).write_text(json.dumps(value, indent=2))
    return Path(path)


def write_table(rows: Sequence[Row], directory: Path, name: str) -> tuple[Path, Path]:
    """Writes rows as directory/name.json (the list as is) and directory/name.csv (flattened)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = write_json(list(rows), directory / f"{name}.json")
    return json_path, write_csv(rows, directory / f"{name}.csv")


@contextlib.contextmanager
def figure(path: Path, *, dpi: int = 80, **subplots: Any) -> Iterator[Any]:
    """Yields the axes of a new figure (`plt.subplots(**subplots)`); on leaving, lays it out and
    saves it to path. matplotlib draws to files only (Agg), so no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def strict_json(value: object) -> str:
    """One line of strict JSON: non-finite floats (a degenerate fit, a diverged loss) become
    null, since NaN and Infinity are not JSON."""

    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False)
