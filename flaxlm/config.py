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


class DistributedInit(enum.StrEnum):
    auto = "auto"  # join when the environment or coordinator_address describes a multi-process job
    always = "always"  # always call jax.distributed.initialize (it reads the environment)
    never = "never"


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
    # Devices along each mesh axis within a slice (ICI: the fast interconnect of one TPU slice,
    # or the NVLink domain of one GPU host); at most one may be -1 (fill with the remaining
    # devices of the slice).
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Slices along each mesh axis (DCN: the data-center network between TPU slices, or between
    # hosts when each process is its own slice). The product is the number of slices; a mesh
    # axis spans ici x dcn devices, with the DCN part outermost. Put only `data` (or `fsdp`)
    # across DCN: it carries one gradient all-reduce per step, not per-layer traffic.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: dict[str, list[str]] = dataclasses.field(default_factory=_default_rules)

    def shape(self) -> dict[str, int]:
        """The ICI (per-slice) sizes; -1 marks the axis that fills the slice."""
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def dcn_shape(self) -> dict[str, int]:
        return {"data": self.dcn_data, "fsdp": self.dcn_fsdp, "tensor": self.dcn_tensor}

    def total_shape(self) -> dict[str, int]:
        """Devices along each axis over all slices (-1 stays -1 until devices are known)."""
        dcn = self.dcn_shape()
        return {a: s if s == -1 else s * dcn[a] for a, s in self.shape().items()}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How the processes of a multi-host run find each other (`jax.distributed`).

    `auto` joins when the environment describes a multi-process job (a TPU pod slice, SLURM
    with several tasks, Open MPI, or `JAX_COORDINATOR_ADDRESS`) or when coordinator_address is
    set; jax then reads the missing values from that environment. Local multi-process runs set
    all three values explicitly (see launch/local.sh).
    """

    initialize: DistributedInit = DistributedInit.auto
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # Seconds to wait for every process to join.
    timeout_seconds: int = 300


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One component of data.mixture: the same source keys as DataConfig, plus a weight."""

    corpus: str = "python-docs"
    train_files: str | None = None
    eval_files: str | None = None
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"
    # Relative sampling weight of this component's documents (normalised over the mixture).
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # The source of documents (see flaxlm/data/sources.py):
    # "python-docs" builds the default corpus from text shipped with the Python interpreter;
    # "files" reads train_files / eval_files (globs of .txt, .jsonl with a `text_field`, or
    # TFRecord files of tf.train.Example with a bytes feature `text_field`; local or gs://);
    # "tfds" reads the TFDS dataset tfds_name (e.g. lm1b, c4/en, tiny_shakespeare) prepared under
    # tfds_data_dir, splits train_split / eval_split; "mixture" samples the sources of `mixture`
    # by weight.
    corpus: str = "python-docs"
    train_files: str | None = None
    eval_files: str | None = None
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"
    mixture: list[SourceConfig] = dataclasses.field(default_factory=list)
    # Where built-in corpora are written (once) before tf.data reads them.
    cache_dir: str = "~/.cache/flaxlm"
    # "byte" (ids 0..255 + BOS/EOS/PAD), "sentencepiece" (a .model file at tokenizer_path; train
    # one with `flaxlm tokenizer train`) or "hf" (a tokenizer.json or its directory).
    tokenizer: str = "byte"
    tokenizer_path: str | None = None
    seq_len: int = 256
    global_batch_size: int = 8
    shuffle_buffer: int = 256
    # BOS before / EOS after every document (the tokenizer's own ids; BOS marks a document
    # start even when a document continues from the previous row).
    add_bos: bool = True
    add_eos: bool = True
    # "documents": rows pack whole documents end to end with segment ids and positions that
    # restart per document (no attention across documents); "concat": plain concatenate and
    # chunk (one segment per row, positions 0..seq_len-1).
    packing: str = "documents"
    # Data shards V: independent, seeded, checkpointable streams whose row-blocks make up the
    # global batch in shard order. 0: the process count of the run that first starts (the value
    # used is saved with every checkpoint). Must be a multiple of the process count.
    num_shards: int = 0
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
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
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


def portable(cfg: Config) -> Config:
    """cfg without this launch's process layout (`distributed`), as saved in run directories
    and checkpoints: a saved config must not make a later command wait for a coordinator."""
    return dataclasses.replace(cfg, distributed=DistributedConfig())


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
    _validate_data(d, m)

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
    for axis, size in mesh.dcn_shape().items():
        _require(size > 0, f"mesh.dcn_{axis}={size} must be positive (slices along {axis})")
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
    check_divisibility(cfg, mesh.total_shape())
    d = cfg.distributed
    explicit = (d.coordinator_address, d.num_processes, d.process_id)
    _require(
        d.num_processes is None or d.num_processes > 0,
        f"distributed.num_processes={d.num_processes} must be positive",
    )
    _require(
        d.process_id is None
        or (d.num_processes is not None and 0 <= d.process_id < d.num_processes),
        f"distributed.process_id={d.process_id} must be in [0, distributed.num_processes)",
    )
    _require(
        d.coordinator_address is None or all(v is not None for v in explicit),
        "distributed.coordinator_address is set: also set distributed.num_processes and "
        "distributed.process_id (or leave all three unset to read them from the environment)",
    )


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


def _validate_source(src: Any, where: str) -> None:
    _require(
        src.corpus in ("python-docs", "files", "tfds"),
        f"{where}.corpus={src.corpus!r} is not python-docs, files, tfds"
        + (" or mixture" if where == "data" else ""),
    )
    if src.corpus == "files":
        _require(
            bool(src.train_files),
            f"{where}.corpus=files needs {where}.train_files (a glob of .txt/.jsonl/.tfrecord)",
        )
    if src.corpus == "tfds":
        _require(bool(src.tfds_name), f"{where}.corpus=tfds needs {where}.tfds_name (e.g. lm1b)")


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    """Data checks that need no files (files and tokenizers are checked by the pipeline)."""
    if d.corpus == "mixture":
        _require(bool(d.mixture), "data.corpus=mixture needs a non-empty data.mixture list")
        for i, component in enumerate(d.mixture):
            where = f"data.mixture[{i}]"
            _validate_source(component, where)
            _require(component.weight > 0, f"{where}.weight={component.weight} must be > 0")
    else:
        _validate_source(d, "data")
    _require(
        d.tokenizer in ("byte", "sentencepiece", "hf"),
        f"data.tokenizer={d.tokenizer!r} is not one of byte, sentencepiece, hf",
    )
    if d.tokenizer != "byte":
        _require(
            bool(d.tokenizer_path),
            f"data.tokenizer={d.tokenizer} needs data.tokenizer_path (the model file or "
            "tokenizer.json)",
        )
    _require(
        d.packing in ("documents", "concat"),
        f"data.packing={d.packing!r} is not documents or concat",
    )
    _require(d.num_shards >= 0, f"data.num_shards={d.num_shards} must be >= 0 (0: automatic)")
    if d.num_shards:
        _require(
            d.global_batch_size % d.num_shards == 0,
            f"data.num_shards={d.num_shards} does not divide data.global_batch_size="
            f"{d.global_batch_size}; every data shard gives an equal block of rows",
        )
    if d.tokenizer == "byte":
        from flaxlm.data.tokenizer import ByteTokenizer

        _require(
            m.vocab_size >= ByteTokenizer.vocab_size,
            f"model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's "
            f"{ByteTokenizer.vocab_size} ids",
        )


def load_files(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Loads several config files merged in order (each after its own defaults), then overrides.

    `load_files([experiment, preset])` runs an experiment with another model preset: the later
    file's keys win. Validated like `load`.
    """
    nodes = [node for path in paths for node in _read_yaml_tree(Path(path))]
    cfg = _merge(nodes, overrides, " + ".join(str(p) for p in paths))
    validate(cfg)
    return cfg
