"""Weights & Biases as an optional tracker (the `wandb` extra), opened by `MetricsWriter`.

The W&B run's id is kept in `RUN_DIR/wandb_id`, so that a restarted run (after a kill, a
preemption, the hang watchdog) goes on logging into the same W&B run. Scalars are logged
against their training `step` as a custom x-axis, so the repeated steps after a restart or a
rollback are kept rather than refused as out of order. Offline mode writes under RUN_DIR/wandb
(`wandb sync` uploads it later); nothing here is needed for training.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from flaxlm.config import ConfigError, WandbConfig

ID_FILE = "wandb_id"


class _Run:
    """A W&B run that logs scalars against the training step."""

    def __init__(self, run: Any):
        self.run = run
        run.define_metric("step")
        run.define_metric("*", step_metric="step")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({"step": step, **scalars})

    def finish(self) -> None:
        import wandb

        self.run.finish()
        # finish() hands the last records to W&B's service process, which writes them to
        # the run's .wandb log afterwards; teardown waits for it, so the log is complete on
        # disk (for `wandb sync`, a copy, the next attempt) when the writer is closed.
        wandb.teardown()


def open_wandb(run_dir: str | os.PathLike, cfg: WandbConfig, config: dict[str, Any]) -> _Run:
    """Starts (or resumes) the W&B run of run_dir."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            f"train.wandb.project={cfg.project} needs Weights & Biases: pip install "
            "'flaxlm[wandb]' (or wandb), or leave train.wandb.project unset"
        ) from e
    run_dir = Path(run_dir)
    id_file = run_dir / ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or run_dir.name,
        id=run_id,
        resume="allow",
        mode=cfg.mode.value,
        dir=str(run_dir),
        config=config,
    )
    return _Run(run)
