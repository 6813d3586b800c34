"""The training loop: the one place where files, clocks, signals and checkpoints meet the steps.

`run(cfg)` trains for `train.steps` steps in `train.run_dir`. It resumes from the newest readable
checkpoint there (state and data position; an unreadable one is moved aside), evaluates at the
start, every `train.eval_every` steps and at the end (and runs the lm-eval tasks of
`train.eval_tasks` on their schedule: `flaxlm.eval_tasks`), checkpoints every
`checkpoint.every_steps` steps and at the end, and on SIGTERM (or JAX's preemption notice) saves
and stops.

The loop is a small driver: `training_steps` dispatches the steps and yields each one, and the
hooks of `flaxlm.hooks` (metrics and logging, evaluation, checkpoints, progress, preemption,
profiling) act on it; `flaxlm.run_state.RunState` keeps what they learn along the way.

The host never waits for the device between steps: step s+1 is dispatched before the metrics of
step s are read back, and those are only a few scalars; the batch of step s+1 is drawn and put
on the devices in a helper thread while the host waits for them. Every step's loss and gradient
norm are checked for NaN/Inf that way; a checkpoint is only written once its step is known to be
finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax

from flaxlm import eval_tasks, fs, hooks, resume, spikes
from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Arch, Config, SpikePolicy, to_dict
from flaxlm.data import pipeline
from flaxlm.data.tokenize import STATS
from flaxlm.data.tokenizer import from_config
from flaxlm.domains import eval_sets as domain_eval_sets
from flaxlm.flops import flops_per_step, param_count, total_peak_flops
from flaxlm.generate import SamplingConfig, generate_text
from flaxlm.goodput import Ledger, process_start_time
from flaxlm.hooks import StepResult
from flaxlm.mesh import make_mesh
from flaxlm.metrics import MetricsWriter, log
from flaxlm.preemption import PreemptionWatcher
from flaxlm.run_dir import check_init_source, check_trainable, init_state_from, write_run_files
from flaxlm.run_lock import RunLock
from flaxlm.run_state import RunState, Throughput, Window
from flaxlm.train import Trainer, TrainState
from flaxlm.watchdog import Watchdog


def training_steps(
    trainer: Trainer,
    state: TrainState,
    data: Iterator[dict],
    steps: range,
    saves: Callable[[int], bool] = lambda step: False,
    profiler: hooks.Profiler | None = None,
) -> Iterator[StepResult]:
    """Dispatches the given steps and yields each one as soon as it is dispatched.

    The next step's batch is drawn and put on the devices in a helper thread while the caller
    handles the step just yielded (tf.data and the transfer release the GIL), except after a
    step for which `saves(step)` is true: its checkpoint records the data position, which must
    not include a batch drawn ahead. `saves` is asked once per step, right after its dispatch.
    """
    prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flaxlm-prefetch")
    next_batch: Future | None = None

    def fetch() -> dict:
        return trainer.global_batch(next(data))

    try:
        for step in steps:
            if profiler is not None:
                profiler.before(step)
            fetch_start = time.perf_counter()
            batch = next_batch.result() if next_batch is not None else fetch()
            next_batch = None
            data_wait = time.perf_counter() - fetch_start
            state, metrics = trainer.step(state, batch)
            if profiler is not None:
                profiler.after(step, metrics)
            if not saves(step):
                next_batch = prefetcher.submit(fetch)
            yield StepResult(step, state, metrics, data_wait)
    finally:
        prefetcher.shutdown()


@dataclasses.dataclass
class RunSummary:
    start_step: int
    end_step: int
    first_eval: dict[str, float] | None
    final_eval: dict[str, float]
    wall_seconds: float
    tokens_per_second: float | None
    median_step_seconds: float | None
    mean_checkpoint_blocking_seconds: float | None
    skipped_steps: int
    loss_spikes: int
    sample: str | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def already_complete(cls, saved: dict[str, Any]) -> RunSummary:
        """The summary of a run found complete: its saved results, no step trained now."""
        known = {f.name: saved.get(f.name) for f in dataclasses.fields(cls)}
        known.update(start_step=saved["end_step"], first_eval=None, wall_seconds=0.0)
        known.update(tokens_per_second=None, median_step_seconds=None)
        return cls(**known)


@dataclasses.dataclass
class _Parts:
    """What a run is made of, opened by `run` and closed when it ends."""

    cfg: Config
    trainer: Trainer
    data: Any  # the checkpointable train iterator
    eval_set: Any
    checkpointer: Checkpointer
    writer: MetricsWriter
    watcher: PreemptionWatcher
    timekeeping: hooks.Timekeeping  # the hang watchdog and the goodput ledger
    domains: dict[str, Any]  # a mixture's components' eval sets by name ({} otherwise)
    tasks: eval_tasks.TaskSet | None  # train.eval_tasks, checked
    tokenizer: Any


def run(cfg: Config) -> RunSummary:
    """Trains cfg in its run directory (resuming it if it holds checkpoints); see above."""
    started = time.perf_counter()
    t = cfg.train
    run_dir = fs.as_path(t.run_dir)
    plan = resume.plan(run_dir, cfg, log)
    if plan.complete is not None:
        return RunSummary.already_complete(plan.complete)
    cfg, t = plan.cfg, plan.cfg.train
    tokenizer = check_trainable(run_dir, cfg)
    tasks = eval_tasks.prepare(t)  # an unknown task stops the run before it starts
    check_init_source(cfg)
    mesh = make_mesh(cfg)
    # Taken before anything writes to the directory (or cleans up its half-written saves).
    lock = RunLock(run_dir).acquire() if jax.process_index() == 0 else None
    watchdog = Watchdog(t, jax.process_index())
    try:
        return _run_locked(cfg, run_dir, tokenizer, mesh, watchdog, started, tasks)
    finally:
        watchdog.close()
        if lock is not None:
            lock.release()


def _run_locked(
    cfg: Config,
    run_dir: Any,
    tokenizer: Any,
    mesh: Any,
    watchdog: Watchdog,
    started: float,
    tasks: eval_tasks.TaskSet | None,
) -> RunSummary:
    t = cfg.train
    write_run_files(run_dir, cfg, tokenizer)

    trainer = Trainer(cfg, mesh)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    writer = watcher = ledger = data = None
    # Everything opened after the checkpoint manager closes with it, even when the data
    # pipeline refuses its files: its background threads must not outlive a clean error.
    try:
        # A resumed run keeps the data shards of its checkpoints, whatever the process count.
        data = pipeline.train_iterator(
            cfg.data, t.seed, jax.process_index(), jax.process_count(), checkpointer.data_shards(),
            t.objective,
        )  # fmt: skip
        eval_set = pipeline.eval_batches(
            cfg.data, jax.process_index(), jax.process_count(), t.objective
        )
        writer = MetricsWriter(run_dir, t.tensorboard, t.wandb, to_dict(cfg))
        watcher = PreemptionWatcher()
        ledger = Ledger(run_dir, jax.process_index() == 0, process_start_time())
        timekeeping = hooks.Timekeeping(ledger, watchdog)
        watchdog.before_exit.append(lambda: ledger.save(force=True))
        domains = domain_eval_sets(cfg.data, jax.process_index(), jax.process_count(), t.objective)
        parts = _Parts(
            cfg, trainer, data, eval_set, checkpointer, writer, watcher, timekeeping, domains,
            tasks, tokenizer,
        )  # fmt: skip
        return _train(parts, started)
    finally:
        # Closing is not a step: Orbax's last barrier waits for the slowest process and the data
        # pipeline's threads take seconds to end. The watchdog gives it the allowance (and still
        # ends a teardown that hangs) instead of the timeout between steps.
        with watchdog.phase("shutdown"):
            if ledger is not None:
                ledger.save(force=True)
            if watcher is not None:
                watcher.close()
            if writer is not None:
                writer.close()
            checkpointer.close()
            if data is not None:
                data.close()


def _train(p: _Parts, started: float) -> RunSummary:
    """The driver: restore or initialise, evaluate, run the steps through the hooks, sum up."""
    t = p.cfg.train
    phase = p.timekeeping.phase
    with phase("restore"):
        state = _restore_or_init(p)
        start = int(jax.device_get(state.step))
    throughput = _throughput(p.cfg, p.trainer, state)
    evaluation = hooks.Evaluate(
        p.trainer, p.eval_set, p.writer, t.eval_every, t.steps, phase, p.domains
    )
    first_eval = evaluation.run(state.params, 0) if start == 0 else None
    progress = hooks.progress_bar(t, start)
    skipped = int(jax.device_get(state.skipped))
    run = RunState(t, throughput, p.writer, p.checkpointer, skipped, progress)
    run.phase = phase
    preemption = hooks.Preemption(p.watcher, p.checkpointer, progress)
    checkpoint = hooks.Checkpoint(p.checkpointer, run, p.data, p.cfg, preemption)
    # In this order: the previous step's metrics are read (and logged) before this step is
    # evaluated, and a checkpoint is on its way before a preemption stops the run.
    on_step = [hooks.ReadMetrics(run), evaluation, checkpoint, hooks.Progress(progress), preemption]
    on_step.insert(1, p.timekeeping)  # right after the previous step's metrics are read
    if p.tasks is not None:  # on the state of the step, before it is checkpointed
        tasks = eval_tasks.EvalTasks(p.trainer, p.tasks, p.tokenizer, p.writer, phase)
        on_step.insert(on_step.index(checkpoint), tasks)
    profiler = hooks.Profiler(t.profile_steps, Path(t.run_dir))
    try:
        state = _run_steps(p, run, state, start, on_step, checkpoint.saves, profiler)
    finally:  # closed before an error's message, or the bar redraws after it at exit
        progress.close()

    final_eval = first_eval
    if start < t.steps or final_eval is None:
        final_eval = evaluation.run(state.params, t.steps)
    with phase("checkpoint"):
        p.checkpointer.wait()
    with phase("other"):
        summary = _summarize(p, run, state, start, first_eval, final_eval, started)
    p.timekeeping.ledger.finish(t.steps)
    if jax.process_index() == 0:
        (fs.as_path(t.run_dir) / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    log(f"trained {t.steps - start} steps; summary in {fs.as_path(t.run_dir) / 'summary.json'}")
    return summary


def _run_steps(
    p: _Parts,
    run: RunState,
    state: TrainState,
    start: int,
    on_step: list[Callable[[StepResult], None]],
    saves: Callable[[int], bool],
    profiler: hooks.Profiler,
) -> TrainState:
    """Runs the steps after start through the hooks; a loss spike that train.on_spike acts on
    rolls the run back to its last checkpoint and goes on from there without the spike's data."""
    skips = spikes.load(p.cfg.train.run_dir)
    while True:
        data = spikes.BatchStream(p.data, skips["skipped_batches"], start)
        steps = range(start + 1, p.cfg.train.steps + 1)
        results = training_steps(p.trainer, state, data, steps, saves, profiler)
        try:
            # Closed on a spike, so that no batch is being drawn while the data is restored.
            with contextlib.closing(results):
                for result in results:
                    for hook in on_step:
                        hook(result)
                    state = result.state
                run.read_pending()
            return state
        except spikes.LossSpike as spike:
            state, start = _roll_back(p, run, skips, spike)


def _roll_back(
    p: _Parts, run: RunState, skips: dict, spike: spikes.LossSpike
) -> tuple[TrainState, int]:
    """Restores the newest checkpoint and records the batches to leave out from now on."""
    t = p.cfg.train
    if len(skips["events"]) >= spikes.MAX_ROLLBACKS:
        raise spikes.SpikeError(
            f"{spike}; the run was rolled back {len(skips['events'])} times already "
            f"({Path(t.run_dir) / spikes.FILE}). Lower optimizer.learning_rate, raise "
            "train.spike_factor or set train.on_spike=log."
        )
    with p.timekeeping.phase("restore"):
        p.checkpointer.wait()
        restored = p.checkpointer.latest_step()
        if restored is None:
            raise spikes.SpikeError(
                f"{spike} before the first checkpoint: nothing to roll back to. Save earlier "
                "(checkpoint.every_steps) or set train.on_spike=log."
            )
        whole = t.on_spike == SpikePolicy.rollback
        batches = spikes.window(spike.step, restored, skips["skipped_batches"], whole)
        first = jax.process_index() == 0
        spikes.record(t.run_dir, skips, spike, restored, batches, write=first)
        state = p.checkpointer.restore(restored, p.trainer.abstract_state, p.data)
    run.pending, run.window = None, Window()
    run.progress.n = restored
    p.timekeeping.ledger.high_water = max(p.timekeeping.ledger.high_water, spike.step)
    log(
        f"{spike}: restored step {restored} and left out data batches {batches} "
        f"(train.on_spike={t.on_spike.value}; recorded in {Path(t.run_dir) / spikes.FILE})"
    )
    return state, restored


def _restore_or_init(p: _Parts) -> TrainState:
    """The newest readable checkpoint's state (and data position), or a fresh state."""
    restored = p.checkpointer.restore_latest_good(p.trainer.abstract_state, p.data, log=log)
    if restored is None and p.cfg.train.init_from:
        return init_state_from(p.trainer, p.cfg, log=log)
    if restored is None:
        return p.trainer.init_state(p.cfg.train.seed)
    step, state = restored
    log(f"resumed from {p.checkpointer.directory / str(step)} at step {step}")
    return state


def _throughput(cfg: Config, trainer: Trainer, state: TrainState) -> Throughput:
    """What a step costs, logged with the model and mesh."""
    n_params = param_count(state.params)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    step_flops = flops_per_step(cfg, n_params)
    peak = total_peak_flops(cfg.train.peak_flops_per_device)
    log(
        f"model: {n_params:,} parameters; mesh {dict(trainer.mesh.shape)} on "
        f"{jax.device_count()} {jax.devices()[0].platform} devices; "
        f"{tokens_per_step:,} tokens per step"
    )
    return Throughput(tokens_per_step, step_flops, peak)


def _summarize(
    p: _Parts,
    run: RunState,
    state: TrainState,
    start: int,
    first_eval: dict[str, float] | None,
    final_eval: dict[str, float],
    started: float,
) -> RunSummary:
    """The run's summary, with a sample of text when train.sample_prompt asks for one."""
    t = p.cfg.train
    text = None
    if t.sample_prompt and p.cfg.model.arch == Arch.decoder:  # an encoder cannot continue text
        sampling = SamplingConfig(temperature=t.sample_temperature, seed=t.seed)
        tok = from_config(p.cfg.data)
        text = generate_text(
            p.trainer, state.params, [t.sample_prompt], t.sample_new_tokens, sampling, tokenizer=tok
        )[0]
    median = run.median_step_seconds()
    summary = RunSummary(
        start_step=start,
        end_step=t.steps,
        first_eval=first_eval,
        final_eval=final_eval,
        wall_seconds=time.perf_counter() - started,
        tokens_per_second=run.throughput.tokens_per_step / median if median is not None else None,
        median_step_seconds=median,
        mean_checkpoint_blocking_seconds=run.mean_checkpoint_blocking_seconds(),
        skipped_steps=run.skipped,
        loss_spikes=run.spikes.count,
        sample=text,
    )
    if STATS["empty_documents"] or STATS["invalid_utf8_documents"]:
        log(
            f"data: {STATS['documents']:,} documents read, {STATS['empty_documents']:,} empty "
            f"(skipped), {STATS['invalid_utf8_documents']:,} with invalid UTF-8 (replaced)"
        )
    return summary
