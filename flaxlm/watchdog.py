"""The hang watchdog: a run that neither dies nor progresses is ended, so that it restarts.

A helper thread watches the time since the loop last made progress (a step whose metrics came
back from the devices). Between steps the limit is `train.hang_timeout_s` (after the first
step), or when that is 0 a generous multiple of the median step time once the run has warmed
up. While the loop starts, restores, compiles (its first step), evaluates or closes down at
the end, the limit is `train.hang_allowance_s`, and while a checkpoint save blocks it
`train.hang_checkpoint_s`: those legitimately take much longer than a step, but not forever.

On a stall the watchdog writes every thread's stack (faulthandler) to
`RUN_DIR/stacks/process-<i>-<time>.txt` and to stderr, then ends the process with
`EXIT_HANG`: on a multi-host job a frozen peer leaves the healthy processes blocked in a
collective, and only an exit lets the scheduler (or launch/local.sh) restart the job, which then
resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator

from flaxlm import fs
from flaxlm.config import TrainConfig

# The exit status of a process ended by the watchdog (EX_TEMPFAIL: try again).
EXIT_HANG = 75
# The automatic timeout: this many median steps, but never under MIN_AUTO_TIMEOUT_S.
AUTO_FACTOR = 20.0
MIN_AUTO_TIMEOUT_S = 300.0
# Steps whose times are not representative (compilation, caches warming up).
WARMUP_STEPS = 3


def _exit_hung() -> None:
    os._exit(EXIT_HANG)  # the main thread is stuck: no clean shutdown can be waited for


class Watchdog:
    """Ends the process, with stack dumps, when the loop stops making progress."""

    def __init__(
        self,
        train: TrainConfig,
        process_index: int,
        on_stall: Callable[[], None] = _exit_hung,
        poll_seconds: float | None = None,
    ):
        self.enabled = train.watchdog
        self.fixed_timeout = train.hang_timeout_s
        self.allowance = train.hang_allowance_s
        self.checkpoint_allowance = train.hang_checkpoint_s
        self.directory = fs.as_path(train.run_dir) / "stacks"
        self.process_index = process_index
        self.on_stall = on_stall
        self.last_progress = time.monotonic()
        self.last_step: int | None = None
        self.phase_name: str | None = "startup"
        self.step_seconds: list[float] = []
        self.fired = False
        # Run before the exit (the goodput ledger records the stall); errors are ignored.
        self.before_exit: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._poll = poll_seconds or min(1.0, max(0.05, self._smallest_limit() / 20))
        self._thread = threading.Thread(target=self._watch, name="flaxlm-watchdog", daemon=True)
        if self.enabled:
            self._thread.start()

    def _smallest_limit(self) -> float:
        limits = [self.allowance, self.checkpoint_allowance]
        limits += [self.fixed_timeout] if self.fixed_timeout > 0 else []
        return min(limits)

    def limit(self) -> float:
        """Seconds without progress that count as a hang now."""
        if self.phase_name == "checkpoint":
            return self.checkpoint_allowance
        if self.phase_name is not None or not self.step_seconds:
            return self.allowance
        if self.fixed_timeout > 0:
            return self.fixed_timeout
        if len(self.step_seconds) < WARMUP_STEPS:
            return self.allowance
        median = statistics.median(self.step_seconds[WARMUP_STEPS - 1 :])
        return max(MIN_AUTO_TIMEOUT_S, AUTO_FACTOR * median)

    def beat(self, step: int) -> None:
        """The loop made progress: step's metrics are back from the devices."""
        now = time.monotonic()
        if self.phase_name is None and self.last_step is not None:
            self.step_seconds.append(now - self.last_progress)
            del self.step_seconds[:-1000]  # a recent median is enough
        self.phase_name = None
        self.last_step, self.last_progress = step, now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Work that may take up to the allowance (compile, restore, checkpoint, evaluation)."""
        outer = self.phase_name
        self.phase_name, self.last_progress = name, time.monotonic()
        try:
            yield
        finally:
            self.phase_name, self.last_progress = outer, time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            stalled = time.monotonic() - self.last_progress
            limit = self.limit()
            if stalled > limit:
                self._report(stalled, limit)
                self.fired = True
                for action in self.before_exit:
                    with contextlib.suppress(Exception):
                        action()
                self.on_stall()
                return

    def _report(self, stalled: float, limit: float) -> None:
        where = f"in {self.phase_name}" if self.phase_name else "between steps"
        message = (
            f"flaxlm watchdog: no progress for {stalled:.0f} s {where} (limit {limit:.0f} s, "
            f"last step {self.last_step}) on process {self.process_index}; writing every "
            "thread's stack and exiting so that the job restarts from its last checkpoint "
            "(train.hang_timeout_s, hang_allowance_s, hang_checkpoint_s and watchdog set this)\n"
        )
        sys.stderr.write(message)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        name = f"process-{self.process_index}-{stamp}.txt"
        path = self.directory / name
        with fs.staged(self.directory) as local, open(local / name, "w", encoding="utf-8") as f:
            f.write(message)
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        sys.stderr.flush()
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        sys.stderr.write(f"flaxlm watchdog: stacks written to {path}\n")
        sys.stderr.flush()

    def close(self) -> None:
        self._stop.set()
