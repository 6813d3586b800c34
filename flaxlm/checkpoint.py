"""Orbax checkpoints of a run: train state, data position and resolved config, saved together.

A checkpoint is one Orbax step directory `checkpoints/<step>/` with three items:

- `state`: the TrainState (params, optimizer state, step), each process writing its shards;
- `data`: the tf.data iterator position of every data shard (`shard_<k>/`, each written by the
  process that owns it) and the number of data shards (`num_shards.json`);
- `config`: the resolved config as JSON, so that a checkpoint can be evaluated on its own.

Saves are asynchronous (training goes on while arrays are written) and atomic (Orbax writes to a
temporary directory and renames it when complete), so a crash mid-save leaves the previous
checkpoint intact. Restoring takes an abstract state whose shardings say where every array goes,
so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from flaxlm import fs
from flaxlm.config import CheckpointConfig, Config, ConfigError, portable, to_dict
from flaxlm.data.pipeline import SHARDS_FILE, DataIterator


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves the positions of the data shards this process owns (`shard_<k>/` each).

    tf.data writes its iterator checkpoints to local files only here: on an object store the
    position is written to a local temporary directory and uploaded (and downloaded to read).
    """

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        if not fs.is_remote(directory):
            args.iterator.save(os.fspath(directory))
            return
        local = Path(tempfile.mkdtemp(prefix="flaxlm-data-"))
        try:
            args.iterator.save(local)
            fs.upload_tree(local, directory)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> DataIterator:
        if not fs.is_remote(directory):
            args.iterator.restore(os.fspath(directory))
            return args.iterator
        local = Path(tempfile.mkdtemp(prefix="flaxlm-data-"))
        try:
            fs.download_tree(directory, local)
            args.iterator.restore(local)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return args.iterator


def saved_num_shards(directory: epath.Path) -> int | None:
    """The number of data shards recorded in a saved data position (any file system), or None."""
    path = directory / SHARDS_FILE
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["num_shards"])


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


def _cause(error: Exception) -> str:
    """The first line of a storage error, without TensorFlow's op decorations: it names the
    cause (e.g. "No space left on device", "File too large") and the file."""
    line = (str(error).strip().splitlines() or [""])[0]
    line = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", line)
    return line[:300]


class _OrbaxThreadErrors(logging.Filter):
    """Orbax's save threads log their exception (with TensorFlow's op decorations and a full
    traceback) before the save call re-raises it; the error reaches the user once, as
    CheckpointSaveError's message, so that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.ERROR
            and "orbax" in record.pathname
            and "raised an exception" in record.getMessage()
        )


logging.getLogger("absl").addFilter(_OrbaxThreadErrors())
# A failed composite save leaves the coroutines of its other items unawaited; Python would warn
# about each at exit, after the error message.
warnings.filterwarnings("ignore", r"coroutine '\w+\.async_save' was never awaited", RuntimeWarning)


class CheckpointSaveError(OSError):
    """A save failed (for example a full disk); the previous checkpoints are untouched."""


def _memory_limits(gb: int | None) -> dict[str, int]:
    """Orbax's bounds on the bytes of arrays in flight at once: copied off the devices, being
    written, being read. Without them a save copies every array to the host before writing."""
    if gb is None:
        return {}
    limits = ("save_concurrent_gb", "save_device_host_concurrent_gb", "restore_concurrent_gb")
    return dict.fromkeys(limits, gb)


class Checkpointer:
    """The checkpoint manager of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig):
        self.directory = fs.as_path(run_dir) / "checkpoints"
        self.every_steps = cfg.every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            # Half-written saves of a killed process (temporary directories) are removed.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(**_memory_limits(cfg.host_memory_gb)),
                "data": DataIteratorHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def data_shards(self) -> int | None:
        """The number of data shards of the newest checkpoint that saved a data position."""
        for step in reversed(self.all_steps()):
            v = saved_num_shards(self.directory / str(step) / "data")
            if v is not None:
                return v
        return None

    def save(self, step: int, state: Any, data: DataIterator | None, cfg: Config) -> None:
        """Starts saving (asynchronously); returns once the arrays are safe to overwrite."""
        items = {
            "state": ocp.args.PyTreeSave(state),
            "config": ocp.args.JsonSave(to_dict(portable(cfg))),
        }
        if data is not None:
            items["data"] = DataIteratorSave(data)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._save_error(step, e) from e

    def _save_error(self, step: int | None, error: Exception) -> CheckpointSaveError:
        previous = [s for s in self.all_steps() if step is None or s < step]
        kept = f"step {previous[-1]} in {self.directory} is intact" if previous else "none existed"
        what = f"saving checkpoint {step}" if step is not None else "finishing a checkpoint"
        return CheckpointSaveError(
            f"{what} failed ({type(error).__name__}: {_cause(error)}); the previous checkpoint: "
            f"{kept}. Free space or fix the storage, then run the same command again to resume"
        )

    def restore(self, step: int, abstract_state: Any, data: DataIterator | None = None) -> Any:
        """Restores the state into the shardings of abstract_state (and the data position)."""
        items = {"state": _pytree_restore(abstract_state)}
        # An imported model (flaxlm convert) has no data position: its data starts afresh.
        if data is not None and (self.directory / str(step) / "data").exists():
            items["data"] = DataIteratorRestore(data)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest_good(
        self, abstract_state: Any, data: DataIterator | None, log=print
    ) -> tuple[int, Any] | None:
        """Restores the newest checkpoint that reads back whole; moves broken newer ones aside.

        A checkpoint counts as broken (truncated or corrupt files) only when an older one
        restores into the same state: it is then renamed to `corrupt-<step>` (kept for
        inspection, never deleted). When no checkpoint restores, nothing is moved: the config
        no longer matches them (another optimizer, more processes, ...) and the error says so.
        Returns (step, state), or None when there is no checkpoint at all.
        """
        failures: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, abstract_state, data)
            except Exception as e:  # judged below, once an older checkpoint has been tried
                failures.append((step, e))
                continue
            for bad, error in failures:
                target = self._quarantine(bad)
                log(
                    f"checkpoint {bad} cannot be restored ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:300]}); moved it to {target}"
                )
            return step, state
        if failures:
            step, error = failures[0]
            raise ConfigError(
                f"no checkpoint in {self.directory} can be restored into this run's config; "
                f"the newest (step {step}) failed with {type(error).__name__}: "
                f"{str(error).splitlines()[0][:500]}. Either the files are damaged, or the "
                "optimizer, data or process count changed since they were written (restore "
                "those settings or use a new train.run_dir). Nothing was moved or deleted."
            ) from error
        return None

    def _quarantine(self, step: int) -> epath.Path:
        source = self.directory / str(step)
        target = self.directory / f"corrupt-{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"corrupt-{step}-{n}"
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"flaxlm quarantine {step}")
        # The manager caches its step list; rebuild it so the step is gone from it.
        self._manager.reload()
        return target

    def check_param_shapes(self, step: int, abstract_params: Any, what: str) -> None:
        """Refuses a checkpoint whose parameters differ in name or shape from abstract_params,
        naming the first difference (before anything is read)."""
        saved = self._manager.item_metadata(step)["state"]["params"]
        got = {
            jax.tree_util.keystr(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_leaves_with_path(saved)
        }
        for p, v in jax.tree_util.tree_leaves_with_path(abstract_params):
            name = jax.tree_util.keystr(p)
            if name not in got:
                raise ConfigError(
                    f"{what} (step {step}) has no parameter {name}: it holds another model; "
                    "use the model config it was trained with (its config.yaml)"
                )
            if got[name] != tuple(v.shape):
                raise ConfigError(
                    f"{what} (step {step}): parameter {name} has shape {got[name]} there but "
                    f"{tuple(v.shape)} in this run's model config; use the model config it was "
                    "trained with (its config.yaml)"
                )

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restores only the parameters (for evaluation and generation)."""
        # A partial restore reads the params subtree only; the optimizer state stays on disk.
        restore = _pytree_restore({"params": abstract_params}, partial=True)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=restore))
        return restored["state"]["params"]

    def wait(self) -> None:
        """Blocks until every started save is on disk (raises if one failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(None, e) from e

    def close(self) -> None:
        self._manager.close()
