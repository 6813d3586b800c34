"""The training loop: the one place where files, clocks, logging and checkpoints meet the steps.

`run(cfg)` trains for `train.steps` steps in `train.run_dir`, resuming from the latest checkpoint
there if one exists (state and data position), evaluating at the start, every `train.eval_every`
steps and at the end, and checkpointing every `checkpoint.every_steps` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flaxlm import config as config_lib
from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, ConfigError
from flaxlm.data import pipeline
from flaxlm.data.tokenizer import ByteTokenizer
from flaxlm.flops import flops_per_token, param_count, total_peak_flops
from flaxlm.generate import sample
from flaxlm.mesh import make_mesh
from flaxlm.metrics import MetricsWriter
from flaxlm.train import Trainer, evaluate


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
    sample: str | None


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


def run(cfg: Config) -> RunSummary:
    started = time.perf_counter()
    t = cfg.train
    run_dir = Path(t.run_dir)
    _check_same_model(run_dir, cfg)
    mesh = make_mesh(cfg)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))

    trainer = Trainer(cfg, mesh)
    data = pipeline.DataIterator(
        pipeline.train_dataset(cfg.data, t.seed, jax.process_index(), jax.process_count())
    )
    eval_set = pipeline.eval_batches(cfg.data, jax.process_index(), jax.process_count())
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    writer = MetricsWriter(run_dir, t.tensorboard)

    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest, trainer.abstract_state, data)
        log(f"resumed from {checkpointer.directory / str(latest)} at step {latest}")
    else:
        state = trainer.init_state(t.seed)
    start = int(jax.device_get(state.step))

    n_params = param_count(state.params)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = flops_per_token(cfg.model, n_params, cfg.data.seq_len) * tokens_per_step
    peak = total_peak_flops(t.peak_flops_per_device)
    log(
        f"model: {n_params:,} parameters; mesh {dict(mesh.shape)} on {jax.device_count()} "
        f"{jax.devices()[0].platform} devices; {tokens_per_step:,} tokens per step"
    )

    first_eval = None
    if start == 0:
        first_eval = _evaluate(trainer, state.params, eval_set, writer, 0)

    progress = tqdm(
        total=t.steps,
        initial=start,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=not t.progress_bar or jax.process_index() != 0,
        dynamic_ncols=True,
    )
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    final_eval = first_eval
    for step in range(start, t.steps):
        fetch_start = time.perf_counter()
        batch = trainer.global_batch(next(data))
        data_wait += time.perf_counter() - fetch_start
        state, metrics = trainer.train_step(state, batch)
        window_steps += 1
        done = step + 1

        if done % t.log_every == 0 or done == t.steps:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            record = _throughput(values, elapsed, window_steps, data_wait, tokens_per_step)
            record["mfu"] = flops_per_step * window_steps / elapsed / peak if peak else None
            writer.write(done, record)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:,.0f}"
            )
            window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"the loss is {record['loss']} at step {done}; the last good checkpoint is "
                    f"step {checkpointer.latest_step()} in {checkpointer.directory}"
                )
        if t.eval_every and done % t.eval_every == 0 and done != t.steps:
            _evaluate(trainer, state.params, eval_set, writer, done)
        if done % checkpointer.every_steps == 0 or done == t.steps:
            checkpointer.save(done, state, data, cfg)
        progress.update(1)
    progress.close()

    if start < t.steps or final_eval is None:
        final_eval = _evaluate(trainer, state.params, eval_set, writer, t.steps)
    checkpointer.wait()
    checkpointer.close()

    text = None
    if t.sample_prompt:
        text = generate_text(
            trainer,
            state.params,
            t.sample_prompt,
            t.sample_new_tokens,
            t.sample_temperature,
            t.seed,
        )
    writer.close()
    return RunSummary(start, t.steps, first_eval, final_eval, time.perf_counter() - started, text)


def _evaluate(trainer: Trainer, params, eval_set, writer: MetricsWriter, step: int) -> dict:
    result = evaluate(trainer, params, eval_set)
    writer.write(step, {f"eval_{k}": v for k, v in result.items()})
    log(f"step {step}: eval loss {result['loss']:.4f}, {result['bits_per_byte']:.4f} bits/byte")
    return result


def _throughput(
    values: dict[str, float], elapsed: float, steps: int, data_wait: float, tokens_per_step: int
) -> dict[str, Any]:
    record = dict(values)
    record["tokens_per_second"] = tokens_per_step * steps / elapsed
    record["step_seconds"] = elapsed / steps
    record["data_wait_seconds"] = data_wait / steps
    return record


def generate_text(
    trainer: Trainer, params, prompt: str, new_tokens: int, temperature: float, seed: int
) -> str:
    tok = ByteTokenizer()
    with trainer.context():
        ids = sample(
            trainer.model,
            params,
            tok.encode(prompt, add_bos=trainer.cfg.data.add_bos),
            new_tokens,
            temperature=temperature,
            seed=seed,
            stop_id=tok.eos_id,
        )
    return tok.decode(ids)
