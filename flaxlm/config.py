"""The typed config tree: schema, YAML composition, command-line overrides and validation.

The schema is a tree of frozen dataclasses. OmegaConf does the merging, the `key.sub=value`
overrides and the type checks (an unknown key or a value of the wrong type fails with the full
key named). Composition is one convention on top: a YAML file may start with

    defaults: [base.yaml, models/tiny.yaml]

listing files (relative to it) that are merged first, in order, then the file itself. Checks that
need more than types (divisibility, ranges, combinations) live in `validate`, which runs before
any device work; checks that need the device count live in `flaxlm.mesh`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot work; the message names the key, the value and the rule."""


class Norm(enum.StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Mlp(enum.StrEnum):
    gelu = "gelu"
    swiglu = "swiglu"


class Position(enum.StrEnum):
    learned = "learned"  # GPT-2: a trained table added to the token embeddings
    sinusoidal = "sinusoidal"  # Vaswani et al.: x + PE(p), nothing trained
    rope = "rope"  # Llama: rotary embeddings applied to queries and keys
    none = "none"  # causal attention alone (NoPE)


class AttentionKernel(enum.StrEnum):
    reference = "reference"  # explicit einsum softmax(QK^T/sqrt(d))V: the oracle
    xla = "xla"  # jax.nn.dot_product_attention, XLA implementation
    cudnn = "cudnn"  # jax.nn.dot_product_attention, cuDNN flash attention (NVIDIA GPUs)
    splash = "splash"  # Pallas splash attention (TPUs; runs interpreted elsewhere, for tests)


class RopeScaling(enum.StrEnum):
    none = "none"
    llama3 = "llama3"  # Llama 3.1+ long-context frequency scaling


class Remat(enum.StrEnum):
    """What the backward pass keeps from the forward pass; the rest is recomputed."""

    none = "none"  # keep everything (fastest, most memory)
    full = "full"  # keep only block inputs: recompute each block (least memory)
    save_dots = "save_dots"  # keep matmul outputs, recompute elementwise ops and softmax
    save_projections = "save_projections"  # keep q/k/v, attention and MLP outputs


class OptimizerName(enum.StrEnum):
    adamw = "adamw"
    adafactor = "adafactor"
    lion = "lion"


class Decay(enum.StrEnum):
    cosine = "cosine"  # cosine from the peak to min_lr_ratio x peak at train.steps
    linear = "linear"  # straight line from the peak to min_lr_ratio x peak
    wsd = "wsd"  # warmup-stable-decay: the peak, then linear decay over the last decay_fraction
    constant = "constant"


class NanPolicy(enum.StrEnum):
    stop = "stop"  # stop the run, naming the step and the last good checkpoint
    skip = "skip"  # drop that update (params and optimizer state unchanged) and count it


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 320
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # Grouped-query attention: number of key/value heads; None means n_heads (plain MHA).
    n_kv_heads: int | None = None
    # Per-head width; None means d_model // n_heads.
    head_dim: int | None = None
    d_ff: int = 1024
    max_seq_len: int = 256
    norm: Norm = Norm.layernorm
    norm_eps: float = 1e-5
    mlp: Mlp = Mlp.gelu
    position: Position = Position.learned
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling.none
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    tie_embeddings: bool = True
    use_bias: bool = True
    attention: AttentionKernel = AttentionKernel.xla
    # nn.scan over layers: one compiled block whatever the depth (compile time flat in depth);
    # parameters then carry a leading `layers` axis.
    scan_layers: bool = False
    remat: Remat = Remat.none
    # Unrolled layers: materialise the residual-stream gradient once at each block boundary
    # (an optimization barrier in the backward pass) instead of letting XLA fuse and
    # recompute it in every consumer; values are unchanged (flaxlm.model.residual_grad_barrier).
    residual_grad_barrier: bool = True
    # Compute dtype of activations and matmuls; parameters stay in param_dtype.
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


def _default_rules() -> dict[str, list[str]]:
    # Logical axis -> mesh axes. Parameters: `embed` is split over fsdp (ZeRO-3 style), the
    # head / mlp / vocab dimensions over tensor (Megatron style). Activations: the batch over
    # data and fsdp, their feature dimensions over tensor where the matching weights are.
    return {
        "batch": ["data", "fsdp"],
        "length": [],
        "vocab": ["tensor"],
        "embed": ["fsdp"],
        "heads": ["tensor"],
        "kv_heads": ["tensor"],
        "head_dim": [],
        "mlp": ["tensor"],
        "layers": [],
        "act_embed": [],
        "act_heads": ["tensor"],
        "act_kv_heads": ["tensor"],
        "act_mlp": ["tensor"],
        "act_vocab": ["tensor"],
    }


MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Devices along each mesh axis; exactly one may be -1 (fill with the remaining devices).
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, list[str]] = dataclasses.field(default_factory=_default_rules)

    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "python-docs" builds the default corpus from text shipped with the Python interpreter;
    # "files" reads train_files / eval_files (globs of .txt files or .jsonl with a "text" field).
    corpus: str = "python-docs"
    train_files: str | None = None
    eval_files: str | None = None
    # Where built-in corpora are written (once) before tf.data reads them.
    cache_dir: str = "~/.cache/flaxlm"
    tokenizer: str = "byte"
    seq_len: int = 256
    global_batch_size: int = 8
    shuffle_buffer: int = 256
    add_bos: bool = True
    add_eos: bool = True
    # Evaluation uses this many global batches of the eval split, always the same ones.
    eval_batches: int = 4


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: Decay = Decay.cosine
    min_lr_ratio: float = 0.1
    # wsd only: the fraction of train.steps spent decaying at the end.
    decay_fraction: float = 0.2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Global-norm clipping threshold; 0 disables clipping.
    grad_clip_norm: float = 1.0
    # Split each batch into this many micro-batches and sum their gradients (same update as the
    # whole batch, a fraction of the activation memory).
    grad_accum_steps: int = 1
    # Weight of the z-loss, mean(logsumexp(logits)^2), which keeps the softmax normaliser near 1
    # (PaLM); 0 disables it.
    z_loss: float = 0.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100
    # Keep the latest max_to_keep checkpoints, and also every checkpoint whose step is a
    # multiple of keep_every (0: none).
    max_to_keep: int = 3
    keep_every: int = 0
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    run_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    # 0 disables periodic evaluation (the run still evaluates at the start and the end).
    eval_every: int = 100
    # Peak FLOP/s of one device for MFU; None uses a known table or measures a matmul on CPU.
    peak_flops_per_device: float | None = None
    progress_bar: bool = True
    tensorboard: bool = True
    # What a NaN or Inf in the loss or gradients does (detected on device at every step).
    nan_policy: NanPolicy = NanPolicy.stop
    # A loss above spike_factor x its running average is logged as a spike (0 disables).
    spike_factor: float = 1.5
    # [first, last): record a profiler trace of these steps under run_dir/profile ([] = none).
    profile_steps: list[int] = dataclasses.field(default_factory=list)
    # Printed after training: a continuation of this prompt (None or "" skips it).
    sample_prompt: str | None = "Once upon a time"
    sample_new_tokens: int = 200
    sample_temperature: float = 0.8


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_yaml_tree(path: Path, chain: tuple[Path, ...] = ()) -> list[Any]:
    """Returns the OmegaConf nodes of `path` and its `defaults`, in merge order."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config files include each other in a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry the line number
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    defaults = node.pop("defaults", [])
    if isinstance(defaults, str) or not OmegaConf.is_list(defaults):
        defaults = [defaults] if defaults else []
    nodes = []
    for parent in defaults:
        nodes += _read_yaml_tree(path.parent / str(parent), (*chain, path))
    return [*nodes, node]


def _merge(nodes: Sequence[Any], overrides: Sequence[str], source: str) -> Config:
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        merged = OmegaConf.merge(schema, *nodes, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        first_line = str(e).splitlines()[0]
        where = f"config key {key!r}" if key else "config"
        raise ConfigError(f"{where} (from {source}): {first_line}") from None
    assert isinstance(cfg, Config)
    return cfg


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a config file (with its defaults), applies overrides, and validates it."""
    nodes = _read_yaml_tree(Path(path)) if path is not None else []
    source = str(path) if path is not None else "defaults"
    cfg = _merge(nodes, overrides, source)
    validate(cfg)
    return cfg


def from_dict(tree: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Builds a validated config from a plain nested dict (for example a saved config)."""
    cfg = _merge([OmegaConf.create(tree)], overrides, "dict")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON-able values (enums as their names)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Returns cfg with fields of some sections replaced: replace(cfg, train={"steps": 5})."""
    updates = {name: dataclasses.replace(getattr(cfg, name), **kv) for name, kv in sections.items()}
    new = dataclasses.replace(cfg, **updates)
    validate(new)
    return new


# ---------------------------------------------------------------------------------------------
# Validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Checks rules that types cannot express. Needs no devices."""
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.train
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        value = getattr(m, key)
        _require(value > 0, f"model.{key}={value} must be positive")
    _require(
        m.n_kv_heads is None or 0 < m.n_kv_heads <= m.n_heads,
        f"model.n_kv_heads={m.n_kv_heads} must be between 1 and model.n_heads={m.n_heads}",
    )
    _require(
        m.n_heads % m.kv_heads == 0,
        f"model.n_kv_heads={m.kv_heads} does not divide model.n_heads={m.n_heads} "
        "(each key/value head serves a whole group of query heads)",
    )
    _require(
        m.head_dim is not None or m.d_model % m.n_heads == 0,
        f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
        "set model.head_dim explicitly",
    )
    if m.position == Position.rope:
        _require(
            m.dim_per_head % 2 == 0,
            f"rotary embeddings need an even head_dim, got {m.dim_per_head}",
        )
    if m.position == Position.sinusoidal:
        _require(
            m.d_model % 2 == 0, f"sinusoidal positions need an even model.d_model, got {m.d_model}"
        )
    if m.attention == AttentionKernel.cudnn:
        _require(
            m.dtype in ("bfloat16", "float16"),
            f"model.attention=cudnn needs model.dtype bfloat16 or float16 (cuDNN flash attention "
            f"has no float32 kernel), got {m.dtype}",
        )
    if m.attention == AttentionKernel.splash:
        _require(
            cfg.data.seq_len % 128 == 0,
            f"model.attention=splash needs data.seq_len divisible by 128 (its block size), "
            f"got {cfg.data.seq_len}",
        )
    for key in ("dtype", "param_dtype"):
        value = getattr(m, key)
        _require(
            value in ("float32", "bfloat16", "float16"),
            f"model.{key}={value!r} is not one of float32, bfloat16, float16",
        )

    _require(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
    )
    _require(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be at least 2 (inputs and targets)")
    _require(
        d.global_batch_size > 0, f"data.global_batch_size={d.global_batch_size} must be positive"
    )
    _require(
        d.corpus in ("python-docs", "files"),
        f"data.corpus={d.corpus!r} is not python-docs or files",
    )
    if d.corpus == "files":
        _require(
            bool(d.train_files),
            "data.corpus=files needs data.train_files (a glob of .txt/.jsonl files)",
        )
    _require(d.tokenizer == "byte", f"data.tokenizer={d.tokenizer!r}: only 'byte' is available")
    from flaxlm.data.tokenizer import ByteTokenizer

    _require(
        m.vocab_size >= ByteTokenizer.vocab_size,
        f"model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's "
        f"{ByteTokenizer.vocab_size} ids",
    )

    _require(
        0 < o.decay_fraction <= 1, f"optimizer.decay_fraction={o.decay_fraction} must be in (0, 1]"
    )
    _require(
        o.grad_accum_steps >= 1, f"optimizer.grad_accum_steps={o.grad_accum_steps} must be >= 1"
    )
    _require(
        d.global_batch_size % o.grad_accum_steps == 0,
        f"optimizer.grad_accum_steps={o.grad_accum_steps} does not divide "
        f"data.global_batch_size={d.global_batch_size}",
    )
    _require(o.z_loss >= 0, f"optimizer.z_loss={o.z_loss} must be >= 0")
    _require(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be positive")
    _require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
    _require(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")

    _require(t.steps > 0, f"train.steps={t.steps} must be positive")
    _require(t.log_every > 0, f"train.log_every={t.log_every} must be positive")
    _require(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0")
    _require(
        cfg.checkpoint.every_steps > 0,
        f"checkpoint.every_steps={cfg.checkpoint.every_steps} must be positive",
    )
    _require(
        cfg.checkpoint.max_to_keep > 0,
        f"checkpoint.max_to_keep={cfg.checkpoint.max_to_keep} must be positive",
    )
    _require(
        cfg.checkpoint.keep_every >= 0,
        f"checkpoint.keep_every={cfg.checkpoint.keep_every} must be >= 0",
    )
    _require(t.spike_factor >= 0, f"train.spike_factor={t.spike_factor} must be >= 0")
    _require(
        not t.profile_steps
        or (len(t.profile_steps) == 2 and 0 <= t.profile_steps[0] < t.profile_steps[1]),
        f"train.profile_steps={t.profile_steps} must be [] or [first, last) with first < last",
    )

    _validate_mesh(cfg)


def _validate_mesh(cfg: Config) -> None:
    mesh = cfg.mesh
    sizes = mesh.shape()
    for axis, size in sizes.items():
        _require(size == -1 or size > 0, f"mesh.{axis}={size} must be positive or -1 (fill)")
    _require(
        sum(size == -1 for size in sizes.values()) <= 1,
        "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (fill with remaining devices)",
    )
    for logical, axes in mesh.rules.items():
        for axis in axes:
            _require(
                axis in MESH_AXES,
                f"mesh.rules.{logical} names mesh axis {axis!r}; the mesh axes are {MESH_AXES}",
            )
    # Divisibility of explicit sizes; -1 axes are checked once the device count is known.
    check_divisibility(cfg, sizes)


def check_divisibility(cfg: Config, sizes: dict[str, int]) -> None:
    """Every sharded dimension must be divisible by the mesh axes its logical axis maps to."""
    m, d = cfg.model, cfg.data
    dims = {
        # Each micro-batch is sharded over the batch axes (the whole batch when not accumulating).
        "batch": (
            "data.global_batch_size / optimizer.grad_accum_steps",
            d.global_batch_size // cfg.optimizer.grad_accum_steps,
        ),
        "vocab": ("model.vocab_size", m.vocab_size),
        "embed": ("model.d_model", m.d_model),
        "heads": ("model.n_heads", m.n_heads),
        "kv_heads": ("model.n_kv_heads", m.kv_heads),
        "mlp": ("model.d_ff", m.d_ff),
        "head_dim": ("model.head_dim", m.dim_per_head),
        "length": ("data.seq_len", d.seq_len),
    }
    for logical, (key, value) in dims.items():
        axes = cfg.mesh.rules.get(logical, [])
        known = [a for a in axes if sizes.get(a, 1) != -1]
        product = 1
        for a in known:
            product *= sizes[a]
        if value % product:
            named = " x ".join(f"mesh.{a}={sizes[a]}" for a in known)
            raise ConfigError(
                f"{named} does not divide {key}={value} (logical axis {logical!r} is sharded "
                f"over {known}); change the mesh or mesh.rules.{logical}"
            )
