"""The training loop: the one place where files, clocks, signals and checkpoints meet the steps.

`run(cfg)` trains for `train.steps` steps in `train.run_dir`. It resumes from the newest readable
checkpoint there (state and data position; an unreadable one is moved aside), evaluates at the
start, every `train.eval_every` steps and at the end, checkpoints every `checkpoint.every_steps`
steps and at the end, and on SIGTERM (or JAX's preemption notice) saves and stops.

The host never waits for the device between steps: step s+1 is dispatched before the metrics of
step s are read back, and those are only a few scalars; the batch of step s+1 is drawn and put
on the devices in a helper thread while the host waits for them. Every step's loss and gradient
norm are checked for NaN/Inf that way; a checkpoint is only written once its step is known to be
finite.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flaxlm import config as config_lib
from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, ConfigError, NanPolicy
from flaxlm.data import pipeline
from flaxlm.data.tokenize import STATS
from flaxlm.data.tokenizer import ByteTokenizer, Tokenizer, save_to_run
from flaxlm.evaluate import check_tokenizer, evaluate
from flaxlm.flops import flops_per_step, param_count, total_peak_flops
from flaxlm.generate import SamplingConfig, generate
from flaxlm.mesh import make_mesh
from flaxlm.metrics import MetricsWriter, SpikeDetector, memory_in_use
from flaxlm.preemption import Preempted, PreemptionWatcher
from flaxlm.train import Trainer


def log(message: str) -> None:
    """Human progress goes to stderr (stdout is for results), from process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)


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


def _check_same_model(run_dir: Path, cfg: Config) -> None:
    """A run directory belongs to one model: refuse to resume it with another architecture."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = config_lib.load(saved_path)
    if saved.model != cfg.model:
        diffs = [
            f"model.{f.name}: {getattr(saved.model, f.name)!r} -> {getattr(cfg.model, f.name)!r}"
            for f in dataclasses.fields(cfg.model)
            if getattr(saved.model, f.name) != getattr(cfg.model, f.name)
        ]
        raise ConfigError(
            f"{run_dir} holds a run of another model ({'; '.join(diffs)}); choose a new "
            "train.run_dir or keep the model config of that run"
        )


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm was NaN/Inf and train.nan_policy is stop."""


@dataclasses.dataclass
class _Window:
    """Timing of the steps since the last log record."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    data_wait: float = 0.0

    def record(self, tokens_per_step: int, flops_per_step: float, peak: float | None) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "tokens_per_second": tokens_per_step * self.steps / elapsed,
            "step_seconds": elapsed / self.steps,
            "data_wait_seconds": self.data_wait / self.steps,
            "compute_seconds": (elapsed - self.data_wait) / self.steps,
            "mfu": flops_per_step * self.steps / elapsed / peak if peak else None,
        }


class _Profiler:
    """Records a jax.profiler trace of steps [first, last) under run_dir/profile."""

    def __init__(self, steps: list[int], run_dir: Path):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.directory = run_dir / "profile"
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step + 1 >= self.last:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            log(f"profiler trace of steps {self.first}..{self.last - 1} in {self.directory}")


def run(cfg: Config) -> RunSummary:
    started = time.perf_counter()
    t = cfg.train
    run_dir = Path(t.run_dir)
    if (run_dir / "PARAMS_ONLY").exists():
        raise ConfigError(
            f"{run_dir} is a parameters-only export (flaxlm export): it has no optimizer state "
            "to resume; train in the original run directory or a new one"
        )
    tokenizer = check_tokenizer(run_dir, cfg)
    _check_same_model(run_dir, cfg)
    mesh = make_mesh(cfg)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_lib.to_yaml(config_lib.portable(cfg)))
        save_to_run(tokenizer, run_dir)

    trainer = Trainer(cfg, mesh)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    # A resumed run keeps the data shards of its checkpoints, whatever the process count now.
    data = pipeline.train_iterator(
        cfg.data, t.seed, jax.process_index(), jax.process_count(), checkpointer.data_shards()
    )
    eval_set = pipeline.eval_batches(cfg.data, jax.process_index(), jax.process_count())
    writer = MetricsWriter(run_dir, t.tensorboard)
    watcher = PreemptionWatcher()
    try:
        return _train(cfg, trainer, data, eval_set, checkpointer, writer, watcher, started)
    finally:
        watcher.close()
        writer.close()
        checkpointer.close()


def _train(cfg, trainer, data, eval_set, checkpointer, writer, watcher, started) -> RunSummary:
    t = cfg.train
    restored = checkpointer.restore_latest_good(trainer.abstract_state, data, log=log)
    if restored is not None:
        step, state = restored
        log(f"resumed from {checkpointer.directory / str(step)} at step {step}")
    else:
        state = trainer.init_state(t.seed)
    start = int(jax.device_get(state.step))

    n_params = param_count(state.params)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    step_flops = flops_per_step(cfg, n_params)
    peak = total_peak_flops(t.peak_flops_per_device)
    log(
        f"model: {n_params:,} parameters; mesh {dict(trainer.mesh.shape)} on "
        f"{jax.device_count()} {jax.devices()[0].platform} devices; "
        f"{tokens_per_step:,} tokens per step"
    )

    first_eval = _evaluate(trainer, state.params, eval_set, writer, 0) if start == 0 else None
    progress = tqdm(
        total=t.steps,
        initial=start,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=not t.progress_bar or jax.process_index() != 0,
        dynamic_ncols=True,
    )
    spikes = SpikeDetector(t.spike_factor)
    profiler = _Profiler(t.profile_steps, Path(t.run_dir))
    window = _Window()
    step_times: list[float] = []
    save_blocking: list[float] = []
    pending: tuple[int, dict] | None = None  # (step, metrics on device), read one step late
    skipped = int(jax.device_get(state.skipped))

    def finish(step: int, metrics: dict) -> None:
        """Host-side handling of one step's metrics: NaN guard, spikes, logging."""
        nonlocal skipped, window
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        window.steps += 1
        finite = bool(values.pop("finite"))
        skipped = int(values["skipped_steps"])
        if not finite and t.nan_policy == NanPolicy.stop:
            last = checkpointer.latest_step()
            where = f"step {last} in {checkpointer.directory}" if last is not None else "none"
            raise NonFiniteLossError(
                f"the loss is {values['loss']} and the gradient norm {values['grad_norm']} at "
                f"step {step}; stopped (train.nan_policy=stop). Last good checkpoint: {where}. "
                "Lower optimizer.learning_rate or set train.nan_policy=skip to drop such steps."
            )
        if not finite:
            log(f"step {step}: non-finite loss or gradients; update skipped ({skipped} so far)")
        if spikes.update(values["loss"]):
            log(f"step {step}: loss spike {values['loss']:.4f} (average {spikes.average:.4f})")
            writer.write(step, {"loss_spike": values["loss"], "loss_average": spikes.average})
        if step % t.log_every == 0 or step == t.steps:
            record = {**values, **window.record(tokens_per_step, step_flops, peak)}
            record.update(memory_in_use())
            writer.write(step, record)
            step_times.append(record["step_seconds"])
            progress.set_postfix(
                loss=f"{values['loss']:.3f}", tok_s=f"{record['tokens_per_second']:,.0f}"
            )
            window = _Window()

    final_eval = first_eval
    # The next step's batch is drawn and put on the devices in a helper thread while the host
    # waits for the previous step's metrics (tf.data and the transfer release the GIL).
    prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flaxlm-prefetch")
    next_batch: Future | None = None

    def fetch() -> dict:
        return trainer.global_batch(next(data))

    for step in range(start + 1, t.steps + 1):
        profiler.before(step)
        fetch_start = time.perf_counter()
        batch = next_batch.result() if next_batch is not None else fetch()
        next_batch = None
        window.data_wait += time.perf_counter() - fetch_start
        state, metrics = trainer.step(state, batch)
        profiler.after(step, metrics)
        preempted = watcher.requested(step)
        saving = step % checkpointer.every_steps == 0 or step == t.steps or preempted
        if not saving:
            # Only when this step saves nothing: a checkpoint records the data position, which
            # must not include a batch drawn ahead.
            next_batch = prefetcher.submit(fetch)
        if pending is not None:
            finish(*pending)  # the previous step's metrics: ready or nearly so
        pending = (step, metrics)

        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            _evaluate(trainer, state.params, eval_set, writer, step)
        if saving:
            finish(*pending)  # never checkpoint a step that is not known to be finite
            pending = None
            save_start = time.perf_counter()
            checkpointer.save(step, state, data, cfg)
            save_blocking.append(time.perf_counter() - save_start)
            writer.write(step, {"checkpoint_blocking_seconds": save_blocking[-1]})
        progress.update(1)
        if preempted:
            checkpointer.wait()
            progress.close()
            raise Preempted(
                step,
                str(checkpointer.directory / str(step)),
                watcher.signal_name or "preemption notice",
            )
    if pending is not None:
        finish(*pending)
    prefetcher.shutdown()
    progress.close()

    if start < t.steps or final_eval is None:
        final_eval = _evaluate(trainer, state.params, eval_set, writer, t.steps)
    checkpointer.wait()

    text = None
    if t.sample_prompt:
        sampling = SamplingConfig(temperature=t.sample_temperature, seed=t.seed)
        prompts = [t.sample_prompt]
        tok = pipeline.tokenizer(cfg.data)
        text = generate_text(
            trainer, state.params, prompts, t.sample_new_tokens, sampling, tokenizer=tok
        )[0]
    trained = t.steps - start
    summary = RunSummary(
        start_step=start,
        end_step=t.steps,
        first_eval=first_eval,
        final_eval=final_eval,
        wall_seconds=time.perf_counter() - started,
        tokens_per_second=tokens_per_step / float(np.median(step_times)) if step_times else None,
        median_step_seconds=float(np.median(step_times)) if step_times else None,
        mean_checkpoint_blocking_seconds=float(np.mean(save_blocking)) if save_blocking else None,
        skipped_steps=skipped,
        loss_spikes=spikes.count,
        sample=text,
    )
    if STATS["empty_documents"] or STATS["invalid_utf8_documents"]:
        log(
            f"data: {STATS['documents']:,} documents read, {STATS['empty_documents']:,} empty "
            f"(skipped), {STATS['invalid_utf8_documents']:,} with invalid UTF-8 (replaced)"
        )
    if jax.process_index() == 0:
        (Path(t.run_dir) / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    log(f"trained {trained} steps; summary in {Path(t.run_dir) / 'summary.json'}")
    return summary


def _evaluate(trainer: Trainer, params, eval_set, writer: MetricsWriter, step: int) -> dict:
    result = evaluate(trainer, params, eval_set)
    writer.write(step, {f"eval_{k}": v for k, v in result.items()})
    log(f"step {step}: eval loss {result['loss']:.4f}, {result['bits_per_byte']:.4f} bits/byte")
    return result


def generate_text(
    trainer: Trainer,
    params,
    prompts: list[str],
    new_tokens: int,
    sampling: SamplingConfig,
    stop_strings: tuple[str, ...] = (),
    tokenizer: Tokenizer | None = None,
) -> list[str]:
    """Continues each prompt; a text ends at EOS or just after the first stop string."""
    tok = tokenizer or ByteTokenizer()
    ids = [tok.encode(p, add_bos=trainer.cfg.data.add_bos) for p in prompts]
    with trainer.context():
        out = generate(
            trainer.model, params, ids, new_tokens, sampling, stop_id=tok.eos_id, pad_id=tok.pad_id
        )
    texts = []
    for prompt, row in zip(prompts, out, strict=True):
        text = tok.decode(row)
        # Stop strings count only in the continuation, after the prompt as the tokenizer decodes it.
        start = len(tok.decode(tok.encode(prompt, add_bos=trainer.cfg.data.add_bos)))
        cut = [text.find(s, start) + len(s) for s in stop_strings if s in text[start:]]
        texts.append(text[: min(cut)] if cut else text)
    return texts
