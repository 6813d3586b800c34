"""A run directory: what a training run leaves behind, and how other commands open it.

A run directory holds `config.yaml` (the resolved config), `checkpoints/` (Orbax), the copy of
the tokenizer the run was trained with under `tokenizer/`, `metrics.jsonl` and `summary.json`.
A parameters-only export (`flaxlm export`) adds a `PARAMS_ONLY` marker and has no optimizer
state. This module creates the directory for training (refusing one that holds another model or
an export), opens it for evaluation and generation on the devices at hand, exports its
parameters, and copies tokenizer files in and out of it.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flaxlm import config as config_lib
from flaxlm import distributed, fs
from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, ConfigError
from flaxlm.data.tokenizer import (
    SENTENCEPIECE_FILE,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    from_config,
)
from flaxlm.mesh import make_mesh
from flaxlm.run_params import restore_params
from flaxlm.train import Trainer, TrainState

Path = fs.PathLike  # any run-directory path: local (relative, ~, $VAR) or gs://

PARAMS_ONLY = "PARAMS_ONLY"  # marker file of a parameters-only export
TOKENIZER_DIR = "tokenizer"
# The tokenizer files of a Hugging Face model directory, copied in and out of a run directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


# -- training into a run directory -------------------------------------------------------------


def check_trainable(run_dir: Path, cfg: Config) -> Tokenizer:
    """The data tokenizer, once cfg is known to be allowed to train in run_dir.

    Refuses a parameters-only export, a directory of another model and a tokenizer that does not
    fit the model or the run.
    """
    if (fs.as_path(run_dir) / PARAMS_ONLY).exists():
        raise ConfigError(
            f"{run_dir} is a parameters-only export (flaxlm export): it has no optimizer state "
            "to resume; train in the original run directory or a new one"
        )
    # The tokenizer is read before the directory is created: a bad one leaves nothing behind.
    tokenizer = check_tokenizer(run_dir, cfg)
    check_same_model(run_dir, cfg)
    check_writable(run_dir, "train.run_dir")
    return tokenizer


def check_writable(directory: Path, what: str) -> None:
    """Refuses a directory that is a file, lies under a file, or cannot be written (read-only,
    no permission), before any work is done."""
    p = fs.as_path(directory)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what}={directory} is a file, not a directory; choose another {what}")
    probe = p / f".flaxlm-write-test-{uuid.uuid4().hex}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ConfigError(
            f"cannot write to {what}={directory} ({reason}); make it writable or choose another "
            f"{what}"
        ) from None


def write_run_files(run_dir: Path, cfg: Config, tokenizer: Tokenizer) -> None:
    """Creates run_dir with the run's config (without its process layout) and tokenizer copy;
    process 0 only."""
    if jax.process_index() == 0:
        fs.as_path(run_dir).mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config_lib.portable(cfg))
        save_tokenizer(tokenizer, run_dir)


def write_config(run_dir: Path, cfg: Config) -> None:
    """Writes cfg as the run's `config.yaml`."""
    (fs.as_path(run_dir) / "config.yaml").write_text(config_lib.to_yaml(cfg))


def check_same_model(run_dir: Path, cfg: Config) -> None:
    """A run directory belongs to one model: refuse to resume it with another architecture."""
    saved_path = fs.as_path(run_dir) / "config.yaml"
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


def check_tokenizer(run_dir: str | Path, cfg: Config) -> Tokenizer:
    """The data tokenizer of a run; refuses one that does not fit the model or the run.

    A run directory with its own tokenizer (an imported model, or an earlier run) must be fed by
    a pipeline with the same vocabulary: byte ids would be meaningless to it.
    """
    tok = from_config(cfg.data)
    saved = fs.as_path(run_dir) / TOKENIZER_DIR
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


# -- the tokenizer copy --------------------------------------------------------------------------


def save_tokenizer(tok: Tokenizer, run_dir: str | Path) -> None:
    """Copies a trained-with tokenizer into RUN_DIR/tokenizer/ for generate and eval."""
    directory = fs.as_path(run_dir) / TOKENIZER_DIR
    if isinstance(tok, SentencePieceTokenizer):
        directory.mkdir(parents=True, exist_ok=True)
        fs.copy_file(tok.path, directory / SENTENCEPIECE_FILE)
    elif isinstance(tok, HFTokenizer):
        directory.mkdir(parents=True, exist_ok=True)
        # The tokenizer may already be the run's own copy (an imported model trained on).
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (tok.directory / name).is_file():
                fs.copy_file(tok.directory / name, directory / name)


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The run's tokenizer: its `tokenizer/tokenizer.json` or SentencePiece model, else bytes."""
    directory = fs.as_path(run_dir) / TOKENIZER_DIR
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(fs.local_copy(directory))
    if (directory / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer(fs.local_copy(directory / SENTENCEPIECE_FILE))
    return ByteTokenizer()


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copies the Hugging Face tokenizer files present in src into dst."""
    src, dst = fs.as_path(src), fs.as_path(dst)
    present = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if present:
        dst.mkdir(parents=True, exist_ok=True)
    for name in present:
        fs.copy_file(src / name, dst / name)


def with_run_tokenizer(cfg: Config, run_dir: str | Path) -> Config:
    """cfg reading the copy of its tokenizer in RUN_DIR/tokenizer/ when the configured file is
    gone (a run directory moved to another machine keeps working)."""
    d = cfg.data
    if d.tokenizer == "byte" or (
        d.tokenizer_path
        and not fs.is_remote(d.tokenizer_path)
        and fs.as_path(d.tokenizer_path).exists()
    ):
        return cfg
    copy = fs.as_path(run_dir) / TOKENIZER_DIR
    copy = copy / SENTENCEPIECE_FILE if d.tokenizer == "sentencepiece" else copy / "tokenizer.json"
    if not copy.is_file():
        return cfg  # the pipeline's own error names the missing path
    # Tokenizer libraries read local files: a run directory on an object store is downloaded.
    local = fs.local_copy(copy.parent) / copy.name
    data = dataclasses.replace(d, tokenizer_path=str(local))
    return dataclasses.replace(cfg, data=data)


# -- opening a finished run ----------------------------------------------------------------------

# Evaluation runs in one process: one slice, FSDP only.
_SINGLE_SLICE = (
    "mesh.data=1",
    "mesh.context=1",
    "mesh.tensor=1",
    "mesh.expert=1",
    "mesh.dcn_data=1",
    "mesh.dcn_context=1",
    "mesh.dcn_fsdp=1",
    "mesh.dcn_tensor=1",
    "mesh.dcn_expert=1",
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
            cfg = config_lib.load(path, [*_SINGLE_SLICE, f"mesh.fsdp={n}", *overrides])
            return cfg, devices[:n]
        except ConfigError:
            if n == 1:
                raise
    raise ConfigError("no devices")  # unreachable: n == 1 returns or raises above


def open_run(
    run_dir: str | Path, overrides: Sequence[str] = ()
) -> tuple[Config, Trainer, Checkpointer]:
    """The config saved in a run directory, a trainer on the local devices, and its (open)
    checkpointer, which has at least one checkpoint; the caller closes it."""
    path = fs.as_path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a flaxlm run directory: it has no config.yaml")
    # A multi-host job (a pod, or distributed.* overrides) evaluates as one: join it before the
    # devices are counted, so the mesh spans every process's devices.
    job = config_lib.load(path, [*_SINGLE_SLICE, "mesh.fsdp=1", *overrides])
    distributed.initialize(job.distributed)
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
    if step is not None and step not in steps:
        checkpointer.close()
        raise ConfigError(f"{run_dir} has no checkpoint at step {step}; it has steps {steps}")
    try:
        params, step = restore_params(
            checkpointer, trainer.abstract_state.params, cfg, run_dir, step
        )
    finally:
        checkpointer.close()
    return cfg, trainer, params, step


def export_params(run_dir: str | Path, dst: str | Path, step: int | None = None) -> int:
    """Writes a run's parameters alone (no optimizer state, no data position) for evaluation.

    DST becomes a directory that `eval` and `generate` take like a run directory, at about a
    third of the size of a full AdamW checkpoint. Returns the exported step.
    """
    dst, src = fs.as_path(dst), fs.as_path(run_dir)
    if dst.exists() and dst.is_dir() and any(dst.iterdir()):
        raise ConfigError(f"{dst} exists and is not empty; choose a new directory")
    check_writable(dst, "the export directory")
    cfg, _, params, step = load_run(src, step)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text((src / "config.yaml").read_text())
    (dst / PARAMS_ONLY).write_text(f"parameters of {src} at step {step}\n")
    if (src / TOKENIZER_DIR).is_dir():  # generate and eval on the export need it
        for f in (src / TOKENIZER_DIR).iterdir():
            (dst / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
            fs.copy_file(f, dst / TOKENIZER_DIR / f.name)
    write_checkpoint(dst, step, {"params": params}, cfg)
    return step


def write_checkpoint(
    run_dir: Path, step: int, state: Any, cfg: Config, host_memory_gb: int | None = None
) -> None:
    """Saves state (without a data position) as the run's checkpoint at step, and waits until
    it is on disk; host_memory_gb, if given, bounds Orbax's in-flight bytes for this save."""
    options = cfg.checkpoint
    if host_memory_gb is not None:
        options = dataclasses.replace(options, host_memory_gb=host_memory_gb)
    checkpointer = Checkpointer(run_dir, options)
    checkpointer.save(step, state, None, cfg)
    checkpointer.wait()
    checkpointer.close()


# -- starting from another run's parameters ------------------------------------------------------


def check_init_source(cfg: Config) -> None:
    """Refuses a train.init_from that is not a run directory (before any device work), or whose
    tokenizer differs from the run's data tokenizer."""
    source = cfg.train.init_from
    if not source:
        return
    src = fs.as_path(source)
    if not (src / "config.yaml").is_file():
        raise ConfigError(
            f"train.init_from={source} is not a flaxlm run directory, export or imported model "
            "(it has no config.yaml); import a Hugging Face model with `flaxlm convert from-hf "
            "SRC DST` and give DST"
        )
    saved = config_lib.load(src / "config.yaml")
    if saved.data.tokenizer != cfg.data.tokenizer:
        raise ConfigError(
            f"train.init_from={source} was trained with data.tokenizer={saved.data.tokenizer} but "
            f"this run has data.tokenizer={cfg.data.tokenizer}; set data.tokenizer="
            f"{saved.data.tokenizer} data.tokenizer_path={saved.data.tokenizer_path} (its copy "
            f"is in {src / TOKENIZER_DIR})"
        )


def init_state_from(trainer: Trainer, cfg: Config, log=print) -> Any:
    """A fresh train state (step 0, new optimizer state) holding the parameters of the run
    directory train.init_from at train.init_from_step (default: its latest checkpoint),
    restored straight into this run's shardings; a shape mismatch names the parameter."""
    source, step = cfg.train.init_from, cfg.train.init_from_step
    src = fs.as_path(source)
    saved = config_lib.load(src / "config.yaml")
    checkpointer = Checkpointer(src, saved.checkpoint)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise ConfigError(f"train.init_from={source} has no checkpoints")
        step = max(steps) if step is None else step
        if step not in steps:
            raise ConfigError(
                f"train.init_from_step={step}: {source} has checkpoints at steps {steps}"
            )
        abstract = trainer.abstract_state.params
        checkpointer.check_param_shapes(step, abstract, f"train.init_from={source}")
        params = checkpointer.restore_params(step, abstract)
    finally:
        checkpointer.close()
    with trainer.context():
        opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(
            params
        )
    log(f"initialised from {src} (step {step}): parameters only, fresh optimizer, step 0")
    # Two arrays, not one: the train step donates its state, and a buffer donated twice crashes.
    step0, skipped0 = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    return TrainState(step=step0, params=params, opt_state=opt_state, skipped=skipped0)
