"""Config of the optional experiment trackers beside metrics.jsonl and TensorBoard."""

from __future__ import annotations

import dataclasses

from flaxlm.config.enums import WandbMode


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    # Weights & Biases logging is on when a project is named (pip install flaxlm[wandb]).
    project: str | None = None
    mode: WandbMode = WandbMode.offline
    entity: str | None = None
    # The run's name in W&B (default: the run directory's name).
    name: str | None = None
