"""The host-side record of a training run: what the loop learns from each step's metrics.

`RunState` reads a step's metrics back from the devices (one step late: the loop hands it a
step's metrics when the next step has been dispatched), applies the NaN policy, flags loss
spikes, writes a log record every `train.log_every` steps with the throughput of the steps since
the previous one, and keeps what the run's summary reports: step times, checkpoint blocking
times, skipped steps and spikes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
import numpy as np

from flaxlm.checkpoint import Checkpointer
from flaxlm.config import NanPolicy, SpikePolicy, TrainConfig
from flaxlm.metrics import MetricsWriter, SpikeDetector, log, memory_in_use
from flaxlm.spikes import LossSpike


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm was NaN/Inf and train.nan_policy is stop."""


@dataclasses.dataclass
class Window:
    """Timing of the steps since the last log record."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    data_wait: float = 0.0

    def record(self, tokens_per_step: int, flops_per_step: float, peak: float | None) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "tokens_per_second": tokens_per_step * self.steps / elapsed,
            "step_seconds": elapsed / self.steps,
            "data_wait_seconds": self.data_wait / self.steps,
            "compute_seconds": (elapsed - self.data_wait) / self.steps,
            "mfu": flops_per_step * self.steps / elapsed / peak if peak else None,
        }


@dataclasses.dataclass
class Throughput:
    """What one step costs: tokens, FLOPs, and the devices' peak FLOP/s (None when unknown)."""

    tokens_per_step: int
    flops_per_step: float
    peak_flops: float | None


class RunState:
    """Meters, spike detector, NaN policy and timings of one run, fed one step at a time."""

    def __init__(
        self,
        train: TrainConfig,
        throughput: Throughput,
        writer: MetricsWriter,
        checkpointer: Checkpointer,
        skipped: int,
        progress: Any,
    ):
        self.train, self.throughput = train, throughput
        self.writer, self.checkpointer, self.progress = writer, checkpointer, progress
        self.skipped = skipped
        self.spikes = SpikeDetector(train.spike_factor)
        self.window = Window()
        self.step_times: list[float] = []
        self.windows_logged = 0
        self.save_blocking: list[float] = []
        # The newest dispatched step whose metrics are still on the device: (step, metrics).
        self.pending: tuple[int, dict] | None = None
        # Brackets work between steps for the watchdog and the goodput ledger (hooks.Timekeeping).
        self.phase: Any = lambda name: contextlib.nullcontext()

    def defer(self, step: int, metrics: dict) -> None:
        """Reads the previous pending step (ready or nearly so); step's metrics wait instead."""
        self.read_pending()
        self.pending = (step, metrics)

    def read_pending(self) -> None:
        """Reads the pending step's metrics now (before a checkpoint, and at the end)."""
        if self.pending is not None:
            step, metrics = self.pending
            self.pending = None
            self.read(step, metrics)

    def read(self, step: int, metrics: dict) -> None:
        """Host-side handling of one step's metrics: NaN guard, spikes, logging."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.window.steps += 1
        finite = bool(values.pop("finite"))
        self.skipped = int(values["skipped_steps"])
        if not finite and self.train.nan_policy == NanPolicy.stop:
            raise self._nonfinite_error(step, values)
        if not finite:
            log(
                f"step {step}: non-finite loss or gradients; update skipped ({self.skipped} so far)"
            )
        if self.spikes.update(values["loss"]):
            average = self.spikes.average
            log(f"step {step}: loss spike {values['loss']:.4f} (average {average:.4f})")
            self.writer.write(step, {"loss_spike": values["loss"], "loss_average": average})
            if self.train.on_spike != SpikePolicy.log:
                raise LossSpike(step, values["loss"], average)
        if step % self.train.log_every == 0 or step == self.train.steps:
            self._write_record(step, values)

    def _nonfinite_error(self, step: int, values: dict[str, float]) -> NonFiniteLossError:
        last = self.checkpointer.latest_step()
        where = f"step {last} in {self.checkpointer.directory}" if last is not None else "none"
        return NonFiniteLossError(
            f"the loss is {values['loss']} and the gradient norm {values['grad_norm']} at "
            f"step {step}; stopped (train.nan_policy=stop). Last good checkpoint: {where}. "
            "Lower optimizer.learning_rate or set train.nan_policy=skip to drop such steps."
        )

    def _write_record(self, step: int, values: dict[str, float]) -> None:
        """The log record of step: its metrics and the timing of the window it closes."""
        t = self.throughput
        record = {**values, **self.window.record(t.tokens_per_step, t.flops_per_step, t.peak_flops)}
        record.update(memory_in_use())
        self.writer.write(step, record)
        # The first window of a (re)started run holds the compilation and warm-up: it is
        # logged, but the run's throughput is the steps after it.
        if self.windows_logged > 0:
            self.step_times.append(record["step_seconds"])
        self.windows_logged += 1
        self.progress.set_postfix(
            loss=f"{values['loss']:.3f}", tok_s=f"{record['tokens_per_second']:,.0f}"
        )
        self.window = Window()

    def timed_save(self, step: int, save) -> None:
        """Runs save() and records how long it blocked the loop."""
        save_start = time.perf_counter()
        with self.phase("checkpoint"):
            save()
        self.save_blocking.append(time.perf_counter() - save_start)
        self.writer.write(step, {"checkpoint_blocking_seconds": self.save_blocking[-1]})

    def median_step_seconds(self) -> float | None:
        return float(np.median(self.step_times)) if self.step_times else None

    def mean_checkpoint_blocking_seconds(self) -> float | None:
        return float(np.mean(self.save_blocking)) if self.save_blocking else None
