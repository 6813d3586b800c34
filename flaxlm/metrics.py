"""Where metrics go: `metrics.jsonl` (one JSON object per record) and TensorBoard event files.

Only process 0 writes; the others get a writer that does nothing, so the loop need not care.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax


class MetricsWriter:
    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._active:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from flax.metrics.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self._active:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible rather than invalid
    return value
