"""The lock of a run directory: one training run owns it at a time.

Process 0 of a run writes `RUN_DIR/LOCK` (host, process id, a token, a heartbeat time) before
anything else touches the directory, refreshes the heartbeat while it trains, and removes the
file at the end. A second `train` on the directory is refused while the owner lives (its
in-progress checkpoint is never cleaned up by the newcomer). A lock left by a dead process is
taken over: on the same host when its process id no longer runs, from another host (a
preempted job restarting elsewhere, an object-store run directory) when its heartbeat is older
than STALE_SECONDS.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from flaxlm import fs
from flaxlm.config import ConfigError

LOCK_FILE = "LOCK"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale(holder: dict[str, Any]) -> bool:
    if holder.get("host") == socket.gethostname():
        return holder.get("pid") == os.getpid() or not _alive(int(holder.get("pid", -1)))
    return time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS


class RunLock:
    """Held by the run that trains in run_dir; `release` (or process exit) gives it up."""

    def __init__(self, run_dir: fs.PathLike):
        self.path = fs.as_path(run_dir) / LOCK_FILE
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "heartbeat": time.time(),
            }
        )

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written by a killed process: nobody holds it
            return {}

    def acquire(self) -> RunLock:
        holder = self._holder()
        if holder and not _stale(holder):
            raise ConfigError(
                f"{self.path.parent} is in use by another training run (process "
                f"{holder.get('pid')} on {holder.get('host')}, lock file {self.path}); wait for "
                "it to finish or stop it, or choose another train.run_dir. A lock of a process "
                f"that is gone is taken over (on another host after {STALE_SECONDS:.0f} s)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self._record())
        # Two starts racing for a free directory both write; the last writer owns it.
        time.sleep(0.05)
        if (self._holder() or {}).get("token") != self.token:
            raise ConfigError(f"{self.path.parent} was just taken by another training run")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="flaxlm-lock")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            # A full disk or a network blip: the next beat tries again.
            with contextlib.suppress(OSError):
                self.path.write_text(self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if (self._holder() or {}).get("token") == self.token:
                self.path.unlink(missing_ok=True)
