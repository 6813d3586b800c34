"""Loss spikes beyond logging: roll back to the last good checkpoint and leave the bad data out.

`train.on_spike` says what a loss spike (a loss above `train.spike_factor` x its running
average) does: `log` only logs it; `skip` restores the newest checkpoint and trains on from
there without the spiking step's batch; `rollback` restores it and leaves out every batch from
the checkpoint to the spike (the data window that led to it).

The batches left out are recorded by their index in the data stream (1 for the first batch
ever drawn) in `RUN_DIR/data_skips.json`, with the spike that caused each window, so that a
restarted run leaves them out too. `BatchStream` draws from the checkpointable data iterator
and passes over the recorded indices: step k gets the k-th batch that was not left out, which
is also how the position of a restored checkpoint maps back to an index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from flaxlm import fs

FILE = "data_skips.json"
# A run that spikes again and again after rolling back has a problem that data cannot fix.
MAX_ROLLBACKS = 10


class LossSpike(Exception):  # noqa: N818 - an event the loop acts on, not an error
    """A loss spike at `step` that `train.on_spike` (skip or rollback) acts on."""

    def __init__(self, step: int, loss: float, average: float):
        super().__init__(f"loss spike at step {step}: {loss:.4f} (average {average:.4f})")
        self.step, self.loss, self.average = step, loss, average


class SpikeError(RuntimeError):
    """A spike that cannot be rolled back: none to return to, or too many already."""


def load(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's record of left-out batches: {"skipped_batches": [...], "events": [...]}."""
    path = fs.as_path(run_dir) / FILE
    if path.exists():
        return json.loads(path.read_text())
    return {"skipped_batches": [], "events": []}


def batch_index(step: int, skipped: list[int]) -> int:
    """The data-stream index of the batch that step trains on (step 0: nothing drawn yet)."""
    index = step
    for s in sorted(skipped):
        if s <= index:
            index += 1
    return index


def window(spike_step: int, checkpoint_step: int, skipped: list[int], whole: bool) -> list[int]:
    """The batch indices to leave out: the spiking step's, or those of every step after the
    checkpoint up to the spike."""
    first = checkpoint_step + 1 if whole else spike_step
    return [batch_index(step, skipped) for step in range(first, spike_step + 1)]


def record(
    run_dir: str | os.PathLike,
    skips: dict[str, Any],
    spike: LossSpike,
    checkpoint_step: int,
    batches: list[int],
    write: bool,
) -> None:
    """Adds the batches of one spike to skips (and to the run directory's file when write)."""
    skips["skipped_batches"] = sorted(set(skips["skipped_batches"]) | set(batches))
    skips["events"].append(
        {
            "step": spike.step,
            "loss": spike.loss,
            "average": spike.average,
            "restored_step": checkpoint_step,
            "skipped_batches": batches,
        }
    )
    if write:
        fs.write_text_atomic(fs.as_path(run_dir) / FILE, json.dumps(skips, indent=2) + "\n")


class BatchStream:
    """The data iterator's batches after `step`, without the left-out ones."""

    def __init__(self, data: Iterator[dict], skipped: list[int], step: int):
        self.data = data
        self.skipped = set(skipped)
        # The index of the last batch drawn (the restored data position).
        self.index = batch_index(step, skipped)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        while True:
            batch = next(self.data)
            self.index += 1
            if self.index not in self.skipped:
                return batch
