"""Hugging Face model directories to flaxlm run directories and back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from flaxlm import config as config_lib
from flaxlm import fs
from flaxlm.config import Config, ConfigError
from flaxlm.convert.byte_tokenizer import write_byte_tokenizer
from flaxlm.convert.hf_config import hf_config, model_overrides_from_hf
from flaxlm.convert.params import check_hf_tensors
from flaxlm.convert.safetensors_io import LazySafetensors, write_sharded
from flaxlm.convert.sp_tokenizer import write_sentencepiece_tokenizer
from flaxlm.convert.streaming import hf_tensors, place_params

# Orbax's bound on array bytes in host memory at once while a conversion saves or restores:
# a fixed cost, where without it a save copies the whole model to the host first.
HOST_MEMORY_GB = 1


def _read_hf_config(path: Path) -> dict:
    """config.json as a dict; an unreadable or incomplete one is named with what is missing."""
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} holds a {type(hf).__name__}, not a JSON object")
    try:
        model_overrides_from_hf(hf)
    except KeyError as e:
        raise ConfigError(
            f"{path} has no {e.args[0]!r}, which a {hf.get('model_type')} config needs; the file "
            "is incomplete"
        ) from None
    return hf


def from_hf(
    src: str | Path, dst: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Converts a Hugging Face model directory into a flaxlm run directory."""
    from flaxlm.mesh import make_mesh
    from flaxlm.run_dir import TOKENIZER_DIR, copy_tokenizer_files, write_checkpoint, write_config
    from flaxlm.train import Trainer, TrainState

    src, dst = Path(fs.expand(src)), fs.as_path(dst)
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} is not a Hugging Face model directory: it has no config.json")
    if (dst / "checkpoints").exists():
        raise ConfigError(f"{dst} already holds checkpoints; choose a new directory")
    hf = _read_hf_config(src / "config.json")
    model_keys = model_overrides_from_hf(hf)
    model = [f"model.{k}={v}" for k, v in model_keys.items() if v is not None]
    if model_keys.get("arch") == "encoder":  # an encoder goes on training as it was trained
        model.append("train.objective=mlm")
    data_len = min(hf.get("n_positions") or hf.get("max_position_embeddings"), 1024)
    # The run trains and evaluates with the model's own tokenizer (copied into dst/tokenizer).
    data = []
    if (src / "tokenizer.json").is_file():
        data = ["data.tokenizer=hf", f"data.tokenizer_path={dst / TOKENIZER_DIR}"]
    tensors = LazySafetensors(src)
    # Parameters keep the checkpoint's dtype (bfloat16 stays bfloat16) unless overridden.
    dtypes = {tensors.dtype(k) for k in tensors if tensors.dtype(k).kind in "fV"}
    if dtypes and all(d.name == "bfloat16" for d in dtypes):
        model.append("model.param_dtype=bfloat16")
    cfg = config_lib.load(
        None, [*model, f"data.seq_len={data_len}", f"train.run_dir={dst}", *data, *overrides]
    )

    trainer = Trainer(cfg, make_mesh(cfg))
    with trainer.context():
        check_hf_tensors(tensors, cfg.model)
        params = place_params(tensors, cfg.model, trainer.abstract_state.params)
    with trainer.context():
        opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(
            params
        )
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=opt_state, skipped=zero)

    dst.mkdir(parents=True, exist_ok=True)
    write_config(dst, cfg)
    write_checkpoint(dst, 0, state, cfg, cfg.checkpoint.host_memory_gb or HOST_MEMORY_GB)
    copy_tokenizer_files(src, dst / TOKENIZER_DIR)
    return cfg


def to_hf(
    run_dir: str | Path,
    dst: str | Path,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[int, list[str]]:
    """Writes a run's parameters as a Hugging Face model directory: safetensors shards of at
    most max_shard_bytes (with model.safetensors.index.json when there are several) in `dtype`
    (default: the parameters' own), converted one layer at a time, and the run's tokenizer (a
    byte-level `tokenizer.json` for a byte run, `tokenizer.model` for a SentencePiece one).
    In a multi-process job (`distributed.*` overrides, or a pod) every process gathers each
    layer in turn and the first one writes. Returns the exported step and the files."""
    from flaxlm.data.tokenizer import SENTENCEPIECE_FILE
    from flaxlm.run_dir import TOKENIZER_DIR, copy_tokenizer_files, load_run

    run_dir = fs.as_path(run_dir)
    cfg, _, params, step = load_run(
        run_dir, step, [f"checkpoint.host_memory_gb={HOST_MEMORY_GB}", *overrides]
    )
    out_dtype = jnp.dtype(dtype or cfg.model.param_dtype)
    config = hf_config(cfg.model)
    config["torch_dtype"] = config["dtype"] = out_dtype.name
    tensors = hf_tensors(params, cfg.model, out_dtype)
    files: list[str] = []
    if jax.process_index() != 0:
        for _ in tensors:  # the gathers are collective: take part, write nothing
            pass
    else:
        with fs.staged(dst) as local:
            local.mkdir(parents=True, exist_ok=True)
            (local / "config.json").write_text(json.dumps(config, indent=2))
            files = write_sharded(tensors, local, max_shard_bytes)
            if cfg.data.tokenizer == "byte":
                write_byte_tokenizer(local, mask=cfg.model.arch == "encoder")
            elif cfg.data.tokenizer == "sentencepiece":
                model = fs.local_copy(run_dir / TOKENIZER_DIR / SENTENCEPIECE_FILE)
                for warning in write_sentencepiece_tokenizer(model, local):
                    print(f"warning: {warning}", file=sys.stderr)
        copy_tokenizer_files(run_dir / TOKENIZER_DIR, dst)
    if jax.process_count() > 1:  # no process leaves before the files are written
        multihost_utils.sync_global_devices("flaxlm to-hf written")
    return step, files
