"""Orbax checkpoints of a run: train state, data position and resolved config, saved together.

A checkpoint is one Orbax step directory `checkpoints/<step>/` with three items:

- `state`: the TrainState (params, optimizer state, step), each process writing its shards;
- `data`: the tf.data iterator position of every process (`process_<i>/`);
- `config`: the resolved config as JSON, so that a checkpoint can be evaluated on its own.

Saves are asynchronous (training goes on while arrays are written) and atomic (Orbax writes to a
temporary directory and renames it when complete), so a crash mid-save leaves the previous
checkpoint intact. Restoring takes an abstract state whose shardings say where every array goes,
so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from flaxlm.config import CheckpointConfig, Config, to_dict
from flaxlm.data.pipeline import DataIterator


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves each process's DataIterator position into its own subdirectory."""

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        args.iterator.save(os.fspath(directory / f"process_{jax.process_index()}"))

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> DataIterator:
        path = directory / f"process_{jax.process_index()}"
        if not path.exists():
            raise FileNotFoundError(
                f"{directory} has no data position for process {jax.process_index()}; it was "
                "saved by fewer processes. Resume with the same number of processes, or start "
                "the data from the beginning."
            )
        args.iterator.restore(os.fspath(path))
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: DataIterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: DataIterator


def _pytree_restore(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore args that place every array in the sharding its ShapeDtypeStruct names."""
    return ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial,
    )


class Checkpointer:
    """The checkpoint manager of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.every_steps = cfg.every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "data": DataIteratorHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data: DataIterator | None, cfg: Config) -> bool:
        items = {
            "state": ocp.args.PyTreeSave(state),
            "config": ocp.args.JsonSave(to_dict(cfg)),
        }
        if data is not None:
            items["data"] = DataIteratorSave(data)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data: DataIterator | None = None) -> Any:
        """Restores the state into the shardings of abstract_state (and the data position)."""
        items = {"state": _pytree_restore(abstract_state)}
        if data is not None:
            items["data"] = DataIteratorRestore(data)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restores only the parameters (for evaluation and generation)."""
        # A partial restore reads the params subtree only; the optimizer state stays on disk.
        restore = _pytree_restore({"params": abstract_params}, partial=True)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=restore))
        return restored["state"]["params"]

    def saved_config(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
