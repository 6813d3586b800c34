"""The goodput ledger: where the wall time of a training job went, kept across its restarts.

`RUN_DIR/goodput.json` splits the job's wall time (every attempt, and the gaps between them)
into categories, each in seconds:

- `productive`: steps that moved the run forward (their data wait excluded);
- `compilation`: the first step of each attempt (tracing and compiling the train step);
- `restore`: opening the run, restoring or initialising the state (startup included);
- `checkpoint`: time the loop was blocked by checkpoint saves;
- `data_wait`: time the loop waited for a batch;
- `evaluation`: evaluations, the final one included;
- `recomputed`: steps done again after a restart (work lost since the last checkpoint);
- `downtime`: from the last record of one attempt to the start of the next (a kill, the
  scheduler's restart);
- `other`: the rest (the end of a run: sample text, summary).

It also counts `productive_steps` and `recomputed_steps`, and `attempts`. The loop books time
as it goes (`phase`, `step`); process 0 rewrites the file at most once a second and at the end,
atomically, so a killed job loses at most a second of its record. The highest step known to be
done (the ledger's own or the last `loss` record in metrics.jsonl, whichever is later) is what a
restart recomputes up to. `flaxlm goodput RUN_DIR` prints the ledger and draws it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flaxlm import fs

CATEGORIES = (
    "productive",
    "compilation",
    "restore",
    "checkpoint",
    "data_wait",
    "evaluation",
    "recomputed",
    "downtime",
    "other",
)
FILE = "goodput.json"
SAVE_EVERY_S = 1.0


def _fresh() -> dict[str, Any]:
    return {
        "wall_seconds": 0.0,
        "goodput": None,
        "seconds": dict.fromkeys(CATEGORIES, 0.0),
        "productive_steps": 0,
        "recomputed_steps": 0,
        "attempts": 0,
        "last_step": 0,
        "updated_at": None,
    }


def load(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ledger of run_dir, or None if it has none."""
    path = fs.as_path(run_dir) / FILE
    return json.loads(path.read_text()) if path.exists() else None


def _last_logged_step(run_dir: Path) -> int:
    """The last step with a loss record in metrics.jsonl (0 if none)."""
    path = run_dir / "metrics.jsonl"
    last = 0
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if "loss" in record:
                    last = max(last, int(record["step"]))
    return last


def process_start_time() -> float:
    """When this process started (wall clock): the ledger counts its startup too, and a
    restart's downtime runs up to it.

    Linux keeps a process's start in clock ticks since boot (/proc/self/stat); measured against
    CLOCK_BOOTTIME it is exact to a tick. (psutil adds the boot time, which the kernel reports
    in whole seconds, so its answer is up to a second early: more than the gap between a killed
    attempt and its restart, whose downtime then came out as nothing.)
    """
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        ticks = int(fields[19])  # starttime, field 22 of the file
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux: count from now
        return time.time()


class Ledger:
    """Books this attempt's time into the job's goodput.json (written by process 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, write: bool, started_wall: float):
        self.path = fs.as_path(run_dir) / FILE
        self.write = write
        self.record = load(run_dir) or _fresh()
        for category in CATEGORIES:
            self.record["seconds"].setdefault(category, 0.0)
        previous = self.record["updated_at"]
        if previous is not None:
            self.record["seconds"]["downtime"] += max(0.0, started_wall - previous)
        self.record["attempts"] += 1
        self.high_water = max(self.record["last_step"], _last_logged_step(fs.as_path(run_dir)))
        self.first_step = True
        self.current = "restore"
        # Time since the process started its run (before this ledger existed) is startup.
        self._mark = time.perf_counter() - max(0.0, time.time() - started_wall)
        self._saved = 0.0

    def _take(self) -> float:
        """The seconds since the last booking, which start a new interval."""
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        return seconds

    def book(self, category: str) -> None:
        """Books the time since the last booking into category."""
        self.record["seconds"][category] += self._take()

    @contextlib.contextmanager
    def phase(self, category: str) -> Iterator[None]:
        """Books the time before into the current category and the time inside into category."""
        self.book(self.current)
        outer, self.current = self.current, category
        try:
            yield
        finally:
            self.book(category)
            self.current = outer

    def step(self, step: int, data_wait_seconds: float) -> None:
        """Books the time since the last booking as step's (called once step is dispatched and
        the step before it is done)."""
        seconds = self._take()
        wait = min(data_wait_seconds, seconds)
        self.record["seconds"]["data_wait"] += wait
        redo = step <= self.high_water
        kind = "compilation" if self.first_step else "recomputed" if redo else "productive"
        self.record["seconds"][kind] += seconds - wait
        self.record["recomputed_steps" if redo else "productive_steps"] += 1
        self.record["last_step"] = max(self.record["last_step"], step - 1)
        self.first_step = False
        self.current = "productive"
        self.save()

    def finish(self, last_step: int) -> None:
        """The run reached last_step; what remains until now is `other`."""
        self.book(self.current)
        self.current = "other"
        self.record["last_step"] = max(self.record["last_step"], last_step)
        self.save(force=True)

    def save(self, force: bool = False) -> None:
        """Writes the ledger (atomically; at most once a second unless forced)."""
        if not self.write or (not force and time.monotonic() - self._saved < SAVE_EVERY_S):
            return
        self.book(self.current)
        r = self.record
        r["updated_at"] = time.time()
        r["wall_seconds"] = sum(r["seconds"].values())
        r["goodput"] = r["seconds"]["productive"] / r["wall_seconds"] if r["wall_seconds"] else None
        fs.write_text_atomic(self.path, json.dumps(r, indent=2) + "\n")
        self._saved = time.monotonic()


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The ledger as a few human lines."""
    wall = record["wall_seconds"] or 1e-9
    lines = [
        f"wall time {record['wall_seconds']:.1f} s over {record['attempts']} attempt(s); "
        f"{record['productive_steps']} productive and {record['recomputed_steps']} recomputed "
        "steps"
    ]
    for category, seconds in record["seconds"].items():
        lines.append(f"  {category:<12} {seconds:10.1f} s  {100 * seconds / wall:5.1f}%")
    return lines


def plot(record: dict[str, Any], path: Path) -> Path:
    """A stacked bar of the ledger's categories (percent of the wall time)."""
    from flaxlm import report

    wall = record["wall_seconds"] or 1e-9
    with report.figure(path, figsize=(7, 2.8)) as ax:
        left = 0.0
        for category, seconds in record["seconds"].items():
            share = 100 * seconds / wall
            ax.barh([0], [share], left=left, label=category)
            left += share
        ax.set_yticks([])
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of wall time")
        ax.legend(ncol=5, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.6))
    return path
