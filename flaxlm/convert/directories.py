"""Hugging Face model directories to flaxlm run directories and back."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm import config as config_lib
from flaxlm.config import Config, ConfigError
from flaxlm.convert.hf_config import hf_config, model_overrides_from_hf
from flaxlm.convert.params import check_shapes, params_from_hf, params_to_hf


def _read_safetensors(src: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{src} has no *.safetensors files (PyTorch .bin files are not read)")
    tensors = {}
    for path in files:
        try:
            with safe_open(str(path), framework="flax") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensors[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
        except Exception as e:  # safetensors raises its own errors for a damaged header
            raise ConfigError(
                f"cannot read {path} ({type(e).__name__}: {str(e)[:200]}); the file is truncated "
                "or not safetensors: download it again"
            ) from None
    return tensors


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

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} is not a Hugging Face model directory: it has no config.json")
    if (dst / "checkpoints").exists():
        raise ConfigError(f"{dst} already holds checkpoints; choose a new directory")
    hf = _read_hf_config(src / "config.json")
    model = [f"model.{k}={v}" for k, v in model_overrides_from_hf(hf).items()]
    data_len = min(hf.get("n_positions") or hf.get("max_position_embeddings"), 1024)
    # The run trains and evaluates with the model's own tokenizer (copied into dst/tokenizer).
    data = []
    if (src / "tokenizer.json").is_file():
        data = ["data.tokenizer=hf", f"data.tokenizer_path={(dst / TOKENIZER_DIR).absolute()}"]
    cfg = config_lib.load(
        None, [*model, f"data.seq_len={data_len}", f"train.run_dir={dst}", *data, *overrides]
    )

    trainer = Trainer(cfg, make_mesh(cfg))
    params = params_from_hf(_read_safetensors(src), cfg.model)
    check_shapes(params, trainer.abstract_state.params)
    params = jax.tree.map(
        lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding),
        params,
        trainer.abstract_state.params,
    )
    with trainer.context():
        opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(
            params
        )
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=opt_state, skipped=zero)

    dst.mkdir(parents=True, exist_ok=True)
    write_config(dst, cfg)
    write_checkpoint(dst, 0, state, cfg)
    copy_tokenizer_files(src, dst / TOKENIZER_DIR)
    return cfg


def to_hf(run_dir: str | Path, dst: str | Path, step: int | None = None) -> None:
    """Writes a run's parameters as a Hugging Face model directory."""
    from safetensors.numpy import save_file

    from flaxlm.run_dir import TOKENIZER_DIR, copy_tokenizer_files, load_run

    run_dir, dst = Path(run_dir), Path(dst)
    cfg, _, params, _ = load_run(str(run_dir), step, [])
    tensors = params_to_hf(
        jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params)), cfg.model
    )
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf_config(cfg.model), indent=2))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer_files(run_dir / TOKENIZER_DIR, dst)
