"""Reading a run's parameters for evaluation, generation and export.

The newest checkpoint is used unless a step is asked for; one that cannot be read (truncated or
corrupt files) is skipped for the previous one, and the skip is said, as training does. Before
anything is read, each checkpoint's own saved config is compared with the run's `config.yaml`:
a `config.yaml` edited to another model is named as such, key by key, not left to surface as a
shape error deep inside the restore.
"""

from __future__ import annotations

import json
from typing import Any

from flaxlm import config as config_lib
from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, ConfigError
from flaxlm.metrics import log


def _saved_model(checkpointer: Checkpointer, step: int) -> dict[str, Any] | None:
    """The model section of the config saved inside checkpoint `step` (None if unreadable)."""
    path = checkpointer.directory / str(step) / "config" / "metadata"
    try:
        return json.loads(path.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def check_model(checkpointer: Checkpointer, step: int, cfg: Config, run_dir: Any) -> None:
    """Refuses a run config whose model differs from the one checkpoint `step` was saved with."""
    saved = _saved_model(checkpointer, step)
    if saved is None:
        return
    now = config_lib.to_dict(cfg)["model"]
    diffs = [f"model.{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
    diffs = [d for d in diffs if not d.split(":")[0].endswith((".dtype", ".remat", ".attention"))]
    if diffs:
        raise ConfigError(
            f"{run_dir}/config.yaml describes another model than its checkpoint {step} "
            f"({'; '.join(diffs)}); restore the run's config.yaml (the checkpoint's own copy is "
            f"{checkpointer.directory / str(step) / 'config' / 'metadata'})"
        )


def restore_params(
    checkpointer: Checkpointer, abstract_params: Any, cfg: Config, run_dir: Any, step: int | None
) -> tuple[Any, int]:
    """The parameters of checkpoint `step`, or of the newest readable one; and its step."""
    steps = checkpointer.all_steps()
    candidates = [step] if step is not None else list(reversed(steps))
    failures: list[tuple[int, Exception]] = []
    for candidate in candidates:
        check_model(checkpointer, candidate, cfg, run_dir)
        try:
            params = checkpointer.restore_params(candidate, abstract_params)
        except Exception as e:  # a damaged checkpoint: try the previous one
            failures.append((candidate, e))
            continue
        for bad, error in failures:
            log(
                f"checkpoint {bad} of {run_dir} cannot be read ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}); using step {candidate}"
            )
        return params, candidate
    bad, error = failures[0]
    raise ConfigError(
        f"checkpoint {bad} of {run_dir} cannot be read ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:300]})"
        + ("" if step is not None else "; no older checkpoint reads back either")
        + ". The files are truncated or damaged: train the run again from its last good "
        "checkpoint or copy the directory again"
    ) from None
