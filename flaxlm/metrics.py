"""Observability: `metrics.jsonl`, TensorBoard and (optionally) Weights & Biases, human progress
on stderr, memory in use, and loss-spike detection.

Every metrics.jsonl record carries its `step` and a `timestamp` (Unix seconds). TensorBoard and
W&B get the same scalars grouped by kind: `eval/` (the eval_* keys, without the prefix), `perf/`
(throughput, timings, memory) and `train/` (the rest). Only process 0 writes; the others get a
writer that does nothing, so the loop need not care.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from flaxlm import fs
from flaxlm.config import WandbConfig, WandbMode

# How often a run directory on an object store gets the new metrics (object stores cannot
# append: the files are written locally and uploaded whole), and always at the end.
UPLOAD_EVERY_SECONDS = 30.0


def log(message: str) -> None:
    """Human progress goes to stderr (stdout is for results), from process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)


# Keys that describe the machine's performance rather than the model's training.
PERF_KEYS = frozenset(
    {
        "tokens_per_second",
        "step_seconds",
        "data_wait_seconds",
        "compute_seconds",
        "mfu",
        "device_memory_bytes",
        "host_memory_bytes",
        "checkpoint_blocking_seconds",
    }
)


def scalar_name(key: str) -> str:
    """The grouped name of a metric in TensorBoard and W&B (eval/loss, perf/mfu, train/loss)."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    if key in PERF_KEYS or key.endswith("_seconds"):
        return "perf/" + key
    return "train/" + key


class MetricsWriter:
    """Appends to RUN_DIR/metrics.jsonl and RUN_DIR/tensorboard/ (local or on an object store,
    where a local copy is uploaded every UPLOAD_EVERY_SECONDS and at close), and logs to W&B
    when configured."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = True,
        wandb: WandbConfig | None = None,
        config: dict[str, Any] | None = None,
    ):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._remote = None
        self._wandb = None
        if not self._active:
            return
        target = fs.as_path(run_dir)
        target.mkdir(parents=True, exist_ok=True)
        local = Path(os.fspath(target))
        if fs.is_remote(target):
            self._remote, self._uploaded = target, time.monotonic()
            local = Path(tempfile.mkdtemp(prefix="flaxlm-metrics-"))
            if (target / "metrics.jsonl").is_file():  # a resumed run continues the file
                fs.copy_file(target / "metrics.jsonl", local / "metrics.jsonl")
        self._local = local
        path = local / "metrics.jsonl"
        _drop_partial_last_line(path)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from flax.metrics.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(local / "tensorboard"))
        if wandb is not None and wandb.project and wandb.mode != WandbMode.disabled:
            from flaxlm.trackers import open_wandb

            self._wandb = open_wandb(local, wandb, config or {})

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self._active:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._jsonl.write(json.dumps({"step": step, **clean, "timestamp": time.time()}) + "\n")
        self._jsonl.flush()
        scalars = {
            scalar_name(key): value
            for key, value in clean.items()
            if isinstance(value, int | float) and math.isfinite(value)
        }
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)
        if self._remote is not None and time.monotonic() - self._uploaded > UPLOAD_EVERY_SECONDS:
            self._upload()

    def _upload(self) -> None:
        fs.upload_tree(self._local, self._remote)
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._remote is not None:
            self._upload()
            shutil.rmtree(self._local, ignore_errors=True)
            self._remote = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible rather than invalid
    return value


def _drop_partial_last_line(path: Path) -> None:
    """A process killed mid-write leaves half a record; cut it so the file stays valid JSONL."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def memory_in_use() -> dict[str, int]:
    """Bytes in use on the first local device (accelerators) and by this process on the host."""
    out = {}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        out["device_memory_bytes"] = int(stats["bytes_in_use"])
    try:
        import psutil

        out["host_memory_bytes"] = int(psutil.Process().memory_info().rss)
    except ImportError:  # psutil comes with the stack, but is not essential
        pass
    return out


class SpikeDetector:
    """Flags a loss above `factor` x its exponential moving average (after a short warm-up)."""

    def __init__(self, factor: float, decay: float = 0.95, warmup: int = 20):
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.average: float | None = None
        self.seen = 0
        self.count = 0

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        spike = (
            self.factor > 0
            and self.average is not None
            and self.seen >= self.warmup
            and loss > self.factor * self.average
        )
        self.count += spike
        # A spike does not move the average: the average describes normal training.
        if not spike:
            self.average = (
                loss
                if self.average is None
                else (self.decay * self.average + (1 - self.decay) * loss)
            )
        self.seen += 1
        return spike
