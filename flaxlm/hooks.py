"""What the training loop does around its steps: evaluation, checkpoints, logging, profiling,
the progress bar and preemption, each a hook that the loop calls with every dispatched step.

A hook is called as `hook(result)` with the `StepResult` of each step, in the order the loop
lists them, right after the step has been dispatched (its metrics still on the device), and
decides itself whether the step concerns it (every N steps, at the last step, on a preemption
notice). Two hooks also answer the step generator right after dispatch: `Checkpoint.saves(step)`
(no batch may be drawn ahead of a step whose checkpoint records the data position) and the
`Profiler`, whose trace brackets the steps it records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flaxlm import report
from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, TrainConfig
from flaxlm.evaluate import evaluate
from flaxlm.goodput import Ledger
from flaxlm.metrics import MetricsWriter, log
from flaxlm.preemption import Preempted, PreemptionWatcher
from flaxlm.run_state import RunState
from flaxlm.train import Trainer, TrainState
from flaxlm.watchdog import Watchdog

Phase = Callable[[str], contextlib.AbstractContextManager]


def no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclasses.dataclass
class StepResult:
    """One dispatched step: its number, the new state, its metrics (still on the device: read
    them one step late) and how long the loop waited for its batch."""

    step: int
    state: TrainState
    metrics: dict[str, jax.Array]
    data_wait_seconds: float


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


class Profiler:
    """Records a jax.profiler trace of steps [first, last) under run_dir/profile."""

    def __init__(self, steps: list[int], run_dir: Path):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.directory = run_dir / "profile"
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step + 1 >= self.last:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            log(f"profiler trace of steps {self.first}..{self.last - 1} in {self.directory}")


class ReadMetrics:
    """Every step: reads the previous step's metrics (NaN policy, spikes, the log record every
    `train.log_every` steps) while this one runs; this step's metrics wait their turn."""

    def __init__(self, run: RunState):
        self.run = run

    def __call__(self, result: StepResult) -> None:
        self.run.window.data_wait += result.data_wait_seconds
        self.run.defer(result.step, result.metrics)


class Timekeeping:
    """Every step (after the previous one's metrics are read): tells the hang watchdog that the
    loop progresses and books the step in the goodput ledger. `phase(name)` brackets the work
    between steps (restore, evaluation, checkpoint) for both."""

    def __init__(self, ledger: Ledger, watchdog: Watchdog):
        self.ledger, self.watchdog = ledger, watchdog

    def __call__(self, result: StepResult) -> None:
        self.watchdog.beat(result.step)
        self.ledger.step(result.step, result.data_wait_seconds)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self.ledger.phase(name), self.watchdog.phase(name):
            yield


class Evaluate:
    """Evaluates every `every` steps (the last step's evaluation is the run's final one), and
    each domain of a mixture by itself (`domains`: eval batches by name)."""

    def __init__(
        self,
        trainer: Trainer,
        eval_set: Any,
        writer: MetricsWriter,
        every: int,
        last: int,
        phase: Phase = no_phase,
        domains: dict[str, Any] | None = None,
    ):
        self.trainer, self.eval_set, self.writer = trainer, eval_set, writer
        self.every, self.last, self.phase = every, last, phase
        self.domains = domains or {}

    def __call__(self, result: StepResult) -> None:
        if _every(result.step, self.every) and result.step != self.last:
            self.run(result.state.params, result.step)

    def run(self, params: Any, step: int) -> dict[str, float]:
        """Evaluates params now and records the result as step's."""
        with self.phase("evaluation"):
            result = evaluate(self.trainer, params, self.eval_set)
            per_domain = {
                name: evaluate(self.trainer, params, b) for name, b in self.domains.items()
            }
        record = {f"eval_{k}": v for k, v in result.items()}
        for name, r in per_domain.items():
            record |= {
                f"eval_loss/{name}": r["loss"],
                f"eval_bits_per_byte/{name}": r["bits_per_byte"],
            }
        self.writer.write(step, record)
        log(f"step {step}: eval loss {result['loss']:.4f}, {result['bits_per_byte']:.4f} bits/byte")
        return result


class Preemption:
    """Stops the run, with `Preempted`, once the checkpoint of a preempted step is on disk."""

    def __init__(self, watcher: PreemptionWatcher, checkpointer: Checkpointer, progress: tqdm):
        self.watcher, self.checkpointer, self.progress = watcher, checkpointer, progress
        self.step: int | None = None

    def requested(self, step: int) -> bool:
        """Asks the watcher once per step (on several hosts a collective sync point)."""
        if self.watcher.requested(step):
            self.step = step
        return self.step == step

    def __call__(self, result: StepResult) -> None:
        if self.step == result.step:
            self.checkpointer.wait()
            self.progress.close()
            raise Preempted(
                result.step,
                str(self.checkpointer.directory / str(result.step)),
                self.watcher.signal_name or "preemption notice",
            )


class Checkpoint:
    """Saves every `checkpoint.every_steps` steps, once `checkpoint.every_minutes` have passed
    since the last save, at the last step and on preemption, and only steps known to be finite:
    the pending metrics are read before the save."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        run: RunState,
        data: Any,
        cfg: Config,
        preemption: Preemption,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.checkpointer, self.run, self.data, self.cfg = checkpointer, run, data, cfg
        self.preemption, self.clock = preemption, clock
        self.saving: int | None = None
        self.last_save = clock()

    def saves(self, step: int) -> bool:
        """Whether step will be saved; asked right after its dispatch, before any prefetch."""
        preempted = self.preemption.requested(step)
        due = _every(step, self.checkpointer.every_steps) or step == self.cfg.train.steps
        due = due or self._minutes_passed()
        self.saving = step if due or preempted else None
        if self.saving == step:
            self.last_save = self.clock()
        return self.saving == step

    def _minutes_passed(self) -> bool:
        """Whether checkpoint.every_minutes have passed since the last save. Hosts' clocks and
        paces differ, so on several processes the first one decides for all (one tiny
        collective per step, only when every_minutes is set)."""
        minutes = self.cfg.checkpoint.every_minutes
        if minutes <= 0:
            return False
        due = self.clock() - self.last_save >= 60 * minutes
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def __call__(self, result: StepResult) -> None:
        if self.saving != result.step:
            return
        self.run.read_pending()  # never checkpoint a step that is not known to be finite
        self.run.timed_save(
            result.step,
            lambda: self.checkpointer.save(result.step, result.state, self.data, self.cfg),
        )


class Progress:
    """Advances the progress bar by one step."""

    def __init__(self, progress: tqdm):
        self.progress = progress

    def __call__(self, result: StepResult) -> None:
        self.progress.update(1)


def progress_bar(train: TrainConfig, start: int) -> tqdm:
    """The progress bar of a run (process 0, unless train.progress_bar is off)."""
    return report.progress(
        total=train.steps, initial=start, desc="train", unit="step", show=train.progress_bar
    )
