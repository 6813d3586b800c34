"""What a run may change when it resumes: the saved config against the one given now.

A run directory keeps the resolved config of the run that wrote it (`config.yaml`). Before a
run trains in a directory that already holds checkpoints, `plan` compares the two:

- changes that cannot resume are refused with the key, both values and the fix: the model's
  shape, the tokenizer (the learnt ids would change meaning), the shape of the data pipeline
  whose position the checkpoint saved (global batch size, sequence length, data shards, packing,
  shuffle buffer), and an optimizer whose state has another structure;
- `train.steps` below the newest checkpoint is refused; equal to it, with the run's summary
  written, the run is already complete and nothing is touched;
- everything else (learning rate, mesh, logging, evaluation, ...) is allowed and listed.

The schedule's horizon (`optimizer.decay_steps`) is fixed when a run first starts: unset, it
becomes `train.steps` then and is saved with the run, so that a later, longer `train.steps`
continues at the schedule's floor instead of stretching the schedule under a running model.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

from flaxlm import config as config_lib
from flaxlm.config import Config, ConfigError

# Data keys whose value the saved data position depends on: a checkpoint's tf.data state
# belongs to a pipeline with exactly these.
_DATA_SHAPE_KEYS = ("global_batch_size", "seq_len", "num_shards", "packing", "shuffle_buffer")
# Keys that never matter when comparing (where and how this launch runs, not what it trains).
_IGNORED = ("train.run_dir", "data.cache_dir", "data.tokenizer_path")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The config to train with (its schedule horizon resolved), and the saved summary when
    the run is already complete (then nothing is to be done)."""

    cfg: Config
    complete: dict[str, Any] | None = None


def checkpoint_steps(run_dir: Any) -> list[int]:
    """The steps of the finished checkpoints in run_dir (Orbax's temporary ones excluded)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _saved_config(run_dir: Any) -> Config | None:
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    return config_lib.load(path)


def plan(run_dir: Any, cfg: Config, log=print) -> Plan:
    """Checks cfg against the run saved in run_dir (see the module doc); returns the plan."""
    saved = _saved_config(run_dir)
    steps = checkpoint_steps(run_dir) if saved is not None else []
    if saved is None or not steps:
        return Plan(_with_horizon(cfg, cfg.train.steps))
    cfg = _with_horizon(cfg, saved.optimizer.decay_steps or saved.train.steps)
    latest = steps[-1]
    _check_steps(run_dir, cfg, latest)
    refused = _refused(run_dir, saved, cfg, latest)
    if refused:
        raise ConfigError(
            f"{run_dir} holds checkpoints (newest: step {latest}) of a run that cannot continue "
            f"with this config: {'; '.join(refused)}. Keep those settings to resume, or train "
            "in a new train.run_dir"
        )
    summary = _complete_summary(run_dir, latest, cfg.train.steps)
    if summary is not None:
        log(
            f"{run_dir} is already complete at step {latest} (train.steps={cfg.train.steps}); "
            "nothing to do. Raise train.steps to train further"
        )
        return Plan(cfg, summary)
    changes = _differences(saved, cfg, skip=_IGNORED)
    if changes:
        log(f"resuming at step {latest} with changed settings: {'; '.join(changes)}")
    _say_horizon(saved, cfg, log)
    return Plan(cfg)


def _with_horizon(cfg: Config, steps: int) -> Config:
    """cfg with optimizer.decay_steps set (to steps when the user left it unset)."""
    if cfg.optimizer.decay_steps is not None:
        return cfg
    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, decay_steps=steps))


def _say_horizon(saved: Config, cfg: Config, log) -> None:
    horizon = cfg.optimizer.decay_steps
    if cfg.train.steps != saved.train.steps and horizon < cfg.train.steps:
        log(
            f"train.steps {saved.train.steps} -> {cfg.train.steps}: the learning-rate schedule "
            f"keeps its horizon, optimizer.decay_steps={horizon}, and stays at its floor after "
            f"it; set optimizer.decay_steps={cfg.train.steps} to stretch it over the new length"
        )


def _check_steps(run_dir: Any, cfg: Config, latest: int) -> None:
    if cfg.train.steps < latest:
        raise ConfigError(
            f"train.steps={cfg.train.steps} is below the newest checkpoint of {run_dir} "
            f"(step {latest}): the run is already past it. Set train.steps above {latest} to "
            f"train further, evaluate it with `flaxlm eval --checkpoint {run_dir}`, or train "
            "in a new train.run_dir"
        )


def _complete_summary(run_dir: Any, latest: int, steps: int) -> dict[str, Any] | None:
    """The saved summary when the run ended at `steps` (its final checkpoint and summary)."""
    path = run_dir / "summary.json"
    if latest != steps or not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("end_step") == steps else None


def _differences(saved: Config, cfg: Config, skip: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every leaf that differs between the two configs."""
    old = _flatten(config_lib.to_dict(config_lib.portable(saved)))
    new = _flatten(config_lib.to_dict(config_lib.portable(cfg)))
    keys = [k for k in new if k not in skip and old.get(k) != new[k]]
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys]


def _show(value: Any) -> str:
    """A value as the config spells it (enums by their value)."""
    return repr(value.value if isinstance(value, enum.Enum) else value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key == "rules" or key == "mixture":  # compared whole
            out[name] = value
        else:
            out.update(_flatten(value, name))
    return out


def _refused(run_dir: Any, saved: Config, cfg: Config, latest: int) -> list[str]:
    """One `key: old -> new (why)` per change the checkpoints cannot follow."""
    refused = [
        f"{d} (the parameters have the saved model's shapes)"
        for d in _differences(saved, cfg)
        if d.startswith("model.")
    ]
    # A checkpoint written without a data position (an imported model, `convert from-hf`)
    # starts its data pipeline afresh: any data shape will do.
    has_data_position = (run_dir / "checkpoints" / str(latest) / "data").exists()
    for key in _DATA_SHAPE_KEYS if has_data_position else ():
        old, new = getattr(saved.data, key), getattr(cfg.data, key)
        if old != new and not (key == "num_shards" and new == 0):
            refused.append(
                f"data.{key}: {_show(old)} -> {_show(new)} (the saved data position belongs to "
                f"a pipeline with data.{key}={_show(old)})"
            )
    refused += _tokenizer_change(run_dir, saved, cfg)
    if _optimizer_structure(saved) != _optimizer_structure(cfg):
        keys = [d for d in _differences(saved, cfg) if d.startswith("optimizer.")]
        refused.append(
            f"{'; '.join(keys)} (the saved optimizer state has another structure; keep "
            f"optimizer.name={saved.optimizer.name} and the clipping/momentum/decay settings "
            "that shape it)"
        )
    return refused


def _tokenizer_bytes(kind: str, path: str | None) -> bytes | None:
    """The tokenizer file's contents (None for bytes or an unreadable path)."""
    if kind == "byte" or not path:
        return None
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "tokenizer.json"
    try:
        return file.read_bytes()
    except OSError:
        return None


def _tokenizer_change(run_dir: Any, saved: Config, cfg: Config) -> list[str]:
    """The tokenizer change, if any: another kind, or a file with other contents than the
    one the run was trained with (its copy in RUN_DIR/tokenizer/ counts as the same)."""
    old, new = saved.data, cfg.data
    why = "(the model's ids would change meaning; keep the run's tokenizer)"
    if old.tokenizer != new.tokenizer:
        return [f"data.tokenizer: {_show(old.tokenizer)} -> {_show(new.tokenizer)} {why}"]
    if new.tokenizer == "byte" or old.tokenizer_path == new.tokenizer_path:
        return []
    copy = run_dir / "tokenizer"
    copies = [_tokenizer_bytes(old.tokenizer, old.tokenizer_path)]
    for name in ("sentencepiece.model", "tokenizer.json"):
        if (copy / name).exists():
            copies.append((copy / name).read_bytes())
    if _tokenizer_bytes(new.tokenizer, new.tokenizer_path) in [c for c in copies if c]:
        return []
    return [f"data.tokenizer_path: {old.tokenizer_path!r} -> {new.tokenizer_path!r} {why}"]


def _optimizer_structure(cfg: Config) -> Any:
    """The tree structure of the optimizer state of a small stand-in parameter tree."""
    import jax
    import jax.numpy as jnp

    from flaxlm.optim import make_optimizer

    params = {"kernel": jnp.zeros((2, 2)), "scale": jnp.zeros((2,))}
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = jax.eval_shape(tx.init, params)
    return jax.tree.structure(state), [x.shape for x in jax.tree.leaves(state)]
