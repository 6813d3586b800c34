"""Noticing that the job is about to be stopped, so that the loop can save and exit cleanly.

Schedulers and cloud VMs send SIGTERM some seconds before they kill a job (SLURM at its time
limit, Kubernetes and GCE on preemption). On TPU pods JAX's distributed runtime also announces
preemption, and every host must agree on the step at which they all save:
`multihost_utils.reached_preemption_sync_point` gives that step.
"""

from __future__ import annotations

import signal
import types

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Records SIGTERM; `requested(step)` says whether to save and stop after this step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        if self.signal_name is not None:
            return True
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:
                # The preemption service only runs where the cluster provides it (TPU pods).
                return False
        return False

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):  # noqa: N818 - it is an outcome, not an error
    """Raised after the checkpoint of the preempted step is safely on disk."""

    def __init__(self, step: int, checkpoint: str, reason: str):
        super().__init__(
            f"stopped at step {step} on {reason} after saving {checkpoint}; run the same command "
            "again to resume from it"
        )
        self.step = step
