"""Evaluating parameters: mean loss, perplexity and bits per byte, during training and after.

Bits per byte (total nats / ln 2 / bytes of text predicted) does not depend on the tokenizer,
so runs with different vocabularies compare on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxlm import config as config_lib
from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, ConfigError
from flaxlm.data import pipeline
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer


def evaluate(
    trainer: Trainer, params, batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte over an iterable of process-local batches."""
    nats = tokens = nbytes = 0.0
    for local in batches:
        sums = jax.device_get(trainer.eval_step(params, trainer.global_batch(local)))
        nats += float(sums["nats"])
        tokens += float(sums["tokens"])
        nbytes += float(sums["bytes"])
    loss = nats / max(tokens, 1.0)
    return {
        "loss": loss,
        "perplexity": float(np.exp(min(loss, 700.0))),
        "bits_per_byte": nats / np.log(2.0) / max(nbytes, 1.0),
        "tokens": int(tokens),
    }


# Evaluation runs in one process: one slice, FSDP only.
_SINGLE_SLICE = (
    "mesh.data=1",
    "mesh.tensor=1",
    "mesh.dcn_data=1",
    "mesh.dcn_fsdp=1",
    "mesh.dcn_tensor=1",
)


def _local_mesh_config(path: Path, overrides: Sequence[str]) -> tuple[Config, list]:
    """The run's config on an FSDP mesh over as many local devices as its shapes allow.

    Whatever mesh trained the checkpoint, evaluation shards the parameters over the devices at
    hand: the largest device count that divides the batch and the model's dimensions.
    """
    devices = jax.devices()
    counts = [n for n in range(len(devices), 0, -1) if len(devices) % n == 0]
    for n in counts:
        try:
            return config_lib.load(path, [*_SINGLE_SLICE, f"mesh.fsdp={n}", *overrides]), devices[
                :n
            ]
        except ConfigError:
            if n == 1:
                raise
    raise ConfigError("no devices")  # unreachable: n == 1 returns or raises above


def open_run(
    run_dir: str | Path, overrides: Sequence[str] = ()
) -> tuple[Config, Trainer, Checkpointer]:
    """The config saved in a run directory, a trainer on the local devices, and its (open)
    checkpointer, which has at least one checkpoint; the caller closes it."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a flaxlm run directory: it has no config.yaml")
    cfg, devices = _local_mesh_config(path, overrides)
    cfg = with_run_tokenizer(cfg, run_dir)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    if not checkpointer.all_steps():
        checkpointer.close()
        raise ConfigError(f"{run_dir} has no checkpoints under {checkpointer.directory}")
    return cfg, Trainer(cfg, make_mesh(cfg, devices)), checkpointer


def load_run(
    run_dir: str | Path, step: int | None = None, overrides: Sequence[str] = ()
) -> tuple[Config, Trainer, Any, int]:
    """The config saved in a run directory, a trainer on the local devices, and its params."""
    cfg, trainer, checkpointer = open_run(run_dir, overrides)
    steps = checkpointer.all_steps()
    if step is None:
        step = max(steps)
    elif step not in steps:
        checkpointer.close()
        raise ConfigError(f"{run_dir} has no checkpoint at step {step}; it has steps {steps}")
    params = checkpointer.restore_params(step, trainer.abstract_state.params)
    checkpointer.close()
    return cfg, trainer, params, step


def with_run_tokenizer(cfg: Config, run_dir: str | Path) -> Config:
    """cfg reading the copy of its tokenizer in RUN_DIR/tokenizer/ when the configured file is
    gone (a run directory moved to another machine keeps working)."""
    from flaxlm.data.tokenizer import SENTENCEPIECE_FILE

    d = cfg.data
    if d.tokenizer == "byte" or (d.tokenizer_path and Path(d.tokenizer_path).expanduser().exists()):
        return cfg
    copy = Path(run_dir) / "tokenizer"
    copy = copy / SENTENCEPIECE_FILE if d.tokenizer == "sentencepiece" else copy / "tokenizer.json"
    if not copy.is_file():
        return cfg  # the pipeline's own error names the missing path
    data = dataclasses.replace(d, tokenizer_path=str(copy))
    return dataclasses.replace(cfg, data=data)


def check_tokenizer(run_dir: str | Path, cfg: Config):
    """The data tokenizer of a run; refuses one that does not fit the model or the run.

    A run directory with its own tokenizer (an imported model, or an earlier run) must be fed by
    a pipeline with the same vocabulary: byte ids would be meaningless to it.
    """
    tok = pipeline.tokenizer(cfg.data)
    saved = Path(run_dir) / "tokenizer"
    if (saved / "tokenizer.json").is_file() and cfg.data.tokenizer == "byte":
        raise ConfigError(
            f"{run_dir} holds a model with its own tokenizer ({saved / 'tokenizer.json'}), but "
            f"data.tokenizer=byte; set data.tokenizer=hf data.tokenizer_path={saved}"
        )
    for key, which in (("add_bos", "bos_id"), ("add_eos", "eos_id")):
        special = getattr(tok, which)
        if getattr(cfg.data, key) and special is not None and special >= cfg.model.vocab_size:
            raise ConfigError(
                f"data.{key}=true but the tokenizer's {which}={special} is outside "
                f"model.vocab_size={cfg.model.vocab_size}; set data.{key}=false or fix the "
                "tokenizer's special tokens"
            )
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} ({cfg.data.tokenizer_path}) has "
            f"{tok.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}; raise "
            "model.vocab_size (a multiple of 64 is fastest)"
        )
    return tok


def evaluate_all_steps(run_dir: str | Path, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Evaluates every checkpoint of a run; writes `eval/table.csv` and `eval/eval_loss.png`."""
    cfg, trainer, checkpointer = open_run(run_dir, overrides)
    check_tokenizer(run_dir, cfg)
    batches = pipeline.eval_batches(cfg.data, jax.process_index(), jax.process_count())
    results = []
    for step in checkpointer.all_steps():
        params = checkpointer.restore_params(step, trainer.abstract_state.params)
        results.append({"step": step, **evaluate(trainer, params, batches)})
    checkpointer.close()
    if jax.process_index() == 0:
        _write_table_and_plot(Path(run_dir) / "eval", results)
    return results


def _write_table_and_plot(directory: Path, results: list[dict[str, Any]]) -> None:
    from flaxlm import report

    directory.mkdir(parents=True, exist_ok=True)
    report.write_csv(results, directory / "table.csv")
    with report.figure(directory / "eval_loss.png", dpi=100, figsize=(6, 4)) as ax:
        ax.plot([r["step"] for r in results], [r["loss"] for r in results], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss (nats per token)")
        ax.set_title(f"eval loss of {directory.parent.name}")
        ax.grid(alpha=0.3)


def evaluate_run(
    run_dir: str | Path, step: int | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Evaluates a checkpoint of a run on its configured eval split."""
    cfg, trainer, params, step = load_run(run_dir, step, overrides)
    check_tokenizer(run_dir, cfg)
    batches = pipeline.eval_batches(cfg.data, jax.process_index(), jax.process_count())
    return {"step": step, **evaluate(trainer, params, batches)}


PARAMS_ONLY_MARKER = "PARAMS_ONLY"


def export_params(run_dir: str | Path, dst: str | Path, step: int | None = None) -> int:
    """Writes a run's parameters alone (no optimizer state, no data position) for evaluation.

    DST becomes a directory that `eval` and `generate` take like a run directory, at about a
    third of the size of a full AdamW checkpoint. Returns the exported step.
    """
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"{dst} exists and is not empty; choose a new directory")
    cfg, _, params, step = load_run(run_dir, step)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text((Path(run_dir) / "config.yaml").read_text())
    (dst / PARAMS_ONLY_MARKER).write_text(
        f"parameters of {Path(run_dir).absolute()} at step {step}\n"
    )
    checkpointer = Checkpointer(dst, cfg.checkpoint)
    checkpointer.save(step, {"params": params}, None, cfg)
    checkpointer.wait()
    checkpointer.close()
    return step
