"""Downstream evaluation during training: lm-evaluation-harness tasks on the running parameters.

`train.eval_tasks` names the tasks: lm-eval task names, or paths of local task YAML files or
directories of them (their datasets local too, so that nothing downloads). `prepare` checks
them when the run starts, before any device work, and `EvalTasks`, a hook of the loop, runs them
every `train.eval_tasks_every` steps and at the last step on the parameters in memory (no
checkpoint round trip), through the adapter of `flaxlm.harness`. Every process runs the same
requests (each holds part of the parameters); process 0 logs each task's numeric metrics as
`eval_task/<task>/<metric>` in metrics.jsonl (TensorBoard: `eval/task/<task>/<metric>`).

lm-eval is imported only when tasks are configured (extra `harness`).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flaxlm.config import ConfigError, TrainConfig
from flaxlm.hooks import Phase, StepResult, no_phase
from flaxlm.metrics import MetricsWriter, log
from flaxlm.train import Trainer

_YAML = (".yaml", ".yml")


@dataclasses.dataclass
class TaskSet:
    """The tasks to run, by name, and the lm-eval task manager that finds them."""

    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager


def _local_tasks(entry: str) -> tuple[str, list[str]] | None:
    """(directory to include, task names) of a local task YAML file or directory; None when
    entry is not a path (a task name)."""
    path = Path(entry)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _YAML)
        return str(path), [n for f in files if (n := _task_name(f))]
    if path.is_file() and path.suffix in _YAML:
        return str(path.parent), [_task_name(path) or path.stem]
    if entry.endswith(_YAML) or "/" in entry:
        raise ConfigError(
            f"train.eval_tasks entry {entry!r} does not exist; give an lm-eval task name or "
            "the path of a local task YAML file or of a directory of them"
        )
    return None


def _task_name(path: Path) -> str | None:
    """The task (or group) a task YAML file defines; None for a file that defines neither
    (a shared template that tasks `include`)."""
    try:
        spec = yaml.load(path.read_text(), Loader=yaml.BaseLoader)  # ignores !function tags
    except yaml.YAMLError as e:
        raise ConfigError(f"train.eval_tasks: {path} is not valid YAML: {e}") from e
    if not isinstance(spec, dict):
        return None
    names = [spec.get("task"), spec.get("group")]  # a group's `task` is its list of tasks
    return next((n for n in names if isinstance(n, str)), None)


def prepare(t: TrainConfig) -> TaskSet | None:
    """The configured tasks, checked: ConfigError (exit 2) names a task lm-eval does not know
    or a local path that is missing. lm-eval's own tasks are indexed (some seconds) only when a
    name is not found among the local ones."""
    if not t.eval_tasks:
        return None
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(
            "train.eval_tasks needs lm-evaluation-harness: pip install 'flaxlm[harness]'"
        ) from e
    include, names = [], []
    for entry in t.eval_tasks:
        local = _local_tasks(entry)
        if local is None:
            names.append(entry)
        else:
            include.append(local[0])
            names.extend(local[1])
    manager = TaskManager(include_path=include or None, include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"train.eval_tasks: lm-eval has no task {', '.join(map(repr, unknown))}; check the "
            "name (`lm_eval ls tasks`), or give the path of a local task YAML file (with "
            "`task: NAME`, `dataset_path: json` and local `data_files`) or of its directory"
        )
    return TaskSet(list(dict.fromkeys(names)), manager)


def scores(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's results as `eval_task/<task>/<metric>` numbers ("acc,none" is `acc`; another
    filter than none is kept: `exact_match/strict-match`). Only "metric,filter" keys count
    (not `alias` or `sample_len`), and only numbers (a stderr not computed is "N/A")."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if "," not in key or not number:
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
            out[f"eval_task/{task}/{name}"] = float(value)
    return out


def evaluate_tasks(lm: Any, tasks: TaskSet, limit: int | None) -> dict[str, float]:
    """Runs the tasks on lm (an lm-eval LM); the scores as `scores` names them. Python's and
    NumPy's global random states are left as they were (lm-eval seeds them)."""
    import lm_eval

    states = random.getstate(), np.random.get_state()
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks.names,
            task_manager=tasks.manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            torch_random_seed=None,
        )
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return scores(out["results"])


class EvalTasks:
    """The hook: runs the tasks every `train.eval_tasks_every` steps and at the last step,
    counted as evaluation in the goodput ledger and by the hang watchdog."""

    def __init__(
        self,
        trainer: Trainer,
        tasks: TaskSet,
        tokenizer: Any,
        writer: MetricsWriter,
        phase: Phase = no_phase,
    ):
        self.trainer, self.tasks, self.tokenizer = trainer, tasks, tokenizer
        self.writer, self.phase = writer, phase
        self.t = trainer.cfg.train
        self.lm = None  # built at the first evaluation; it keeps its compiled functions

    def due(self, step: int) -> bool:
        every = self.t.eval_tasks_every
        return step == self.t.steps or (every > 0 and step % every == 0)

    def __call__(self, result: StepResult) -> None:
        if self.due(result.step):
            self.run(result.state.params, result.step)

    def run(self, params: Any, step: int) -> dict[str, float]:
        """Evaluates the tasks on params and records the scores as step's."""
        from flaxlm.harness import FlaxLM

        with self.phase("evaluation"):
            if self.lm is None:
                self.lm = FlaxLM.from_params(self.trainer, params, self.tokenizer, step)
            self.lm.params, self.lm.step = params, step
            record = evaluate_tasks(self.lm, self.tasks, self.t.eval_tasks_limit)
        self.writer.write(step, record)
        shown = ", ".join(f"{k.removeprefix('eval_task/')} {v:.4g}" for k, v in record.items())
        log(f"step {step}: eval tasks: {shown}")
        return record
