"""Noticing that the job is about to be stopped, so that the loop can save and exit cleanly.

Schedulers and cloud VMs send SIGTERM some seconds before they kill a job (SLURM at its time
limit, Kubernetes and GCE on preemption). In a single process we catch it ourselves. With several
processes every host must save at the same step, and only some may have been signalled: there
JAX's distributed runtime catches SIGTERM, spreads the notice to all hosts and picks a common
step, which `multihost_utils.reached_preemption_sync_point` reports. We then leave SIGTERM to it.
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
        self._multi_process = jax.process_count() > 1
        self._previous = signal.getsignal(signal.SIGTERM)
        if not self._multi_process:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        if not self._multi_process:
            return self.signal_name is not None
        try:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = "preemption notice"
                return True
        except RuntimeError:
            pass  # the preemption service is switched off (jax_enable_preemption_service)
        return False

    def close(self) -> None:
        if not self._multi_process:
            signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):  # noqa: N818 - it is an outcome, not an error
    """Raised after the checkpoint of the preempted step is safely on disk."""

    def __init__(self, step: int, checkpoint: str, reason: str):
        super().__init__(
            f"stopped at step {step} on {reason} after saving {checkpoint}; run the same command "
            "again to resume from it"
        )
        self.step = step
