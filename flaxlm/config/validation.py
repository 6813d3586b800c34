"""Checks that need more than types: divisibility, ranges and combinations of settings.

`validate` runs before any device work and names the key, the value and the rule in its
`ConfigError`; checks that need the device count live in `flaxlm.mesh` (which calls
`check_divisibility` with the resolved mesh).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import typing
from typing import Any

from flaxlm.config.checks import require as _require
from flaxlm.config.checks import require_each
from flaxlm.config.enums import (
    BYTE_VOCAB_SIZE,
    Arch,
    AttentionKernel,
    ConfigError,
    Corpus,
    DType,
    Position,
    TokenizerKind,
)
from flaxlm.config.mlm import validate_mlm
from flaxlm.config.moe import validate_moe
from flaxlm.config.schema import (
    MESH_AXES,
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    ModelConfig,
    OptimizerConfig,
    SourceFields,
    TrainConfig,
)


def validate(cfg: Config) -> None:
    """Checks rules that types cannot express, section by section. Needs no devices."""
    _validate_choices(cfg)
    _validate_model(cfg.model, cfg.data)
    _validate_data(cfg.data, cfg.model)
    _validate_optimizer(cfg.optimizer, cfg.data)
    _validate_train(cfg.train)
    _validate_checkpoint(cfg.checkpoint)
    _validate_mesh(cfg)
    _validate_distributed(cfg.distributed)
    validate_mlm(cfg)


@functools.cache
def _enum_fields(section_type: type) -> dict[str, list[str]]:
    """The enum fields of a config section and the values each accepts."""
    hints = typing.get_type_hints(section_type)
    return {
        name: [str(member.value) for member in kind]
        for name, kind in hints.items()
        if isinstance(kind, type) and issubclass(kind, enum.Enum)
    }


def _validate_choices(cfg: Config) -> None:
    """Enum fields hold one of their choices. Loading already ensures it (OmegaConf checks
    types); this covers configs built or replaced in code."""

    def check(section: Any, where: str) -> None:
        for name, choices in _enum_fields(type(section)).items():
            value = getattr(section, name)
            _require(
                value in choices, f"{where}.{name}={value!r} is not one of {', '.join(choices)}"
            )

    for field in dataclasses.fields(cfg):
        check(getattr(cfg, field.name), field.name)
    for i, component in enumerate(cfg.data.mixture):
        check(component, f"data.mixture[{i}]")
    check(cfg.model.moe, "model.moe")


def _validate_model(m: ModelConfig, d: DataConfig) -> None:
    validate_moe(m.moe, m.n_layers, m.scan_layers)
    positive = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
    require_each(m, "model", positive, lambda v: v > 0, "must be positive")
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
    _require(
        m.rope_scaling == "none" or m.position == Position.rope,
        f"model.rope_scaling={m.rope_scaling} scales rotary embeddings, but model.position="
        f"{m.position}; set model.position=rope or model.rope_scaling=none",
    )
    if m.position == Position.rope:
        _require(
            m.dim_per_head % 2 == 0,
            f"rotary embeddings need an even head_dim, got {m.dim_per_head}",
        )
        _require(
            m.rope_scaling == "none" or m.rope_scaling_factor >= 1,
            f"model.rope_scaling_factor={m.rope_scaling_factor} must be >= 1 (how many times "
            "longer the context gets)",
        )
    if m.position == Position.sinusoidal:
        _require(
            m.d_model % 2 == 0, f"sinusoidal positions need an even model.d_model, got {m.d_model}"
        )
    _require(
        m.sliding_window is None or m.sliding_window > 0,
        f"model.sliding_window={m.sliding_window} must be positive (or null for full attention)",
    )
    _require(
        m.global_every >= 0 and (m.global_every == 0 or m.sliding_window is not None),
        f"model.global_every={m.global_every} needs model.sliding_window (and must be >= 0)",
    )
    _require(
        m.global_every == 0 or not m.scan_layers,
        "model.global_every alternates the attention of layers, which nn.scan cannot do; "
        "set model.scan_layers=false",
    )
    scales = ("query_scale", "attn_logit_softcap", "final_logit_softcap")
    require_each(m, "model", scales, lambda v: v is None or v > 0, "must be positive or null")
    dropouts = ("dropout_embed", "dropout_attn", "dropout_residual")
    require_each(m, "model", dropouts, lambda rate: 0.0 <= rate < 1.0, "must be in [0, 1)")
    if m.attention == AttentionKernel.cudnn:
        _require(
            m.dtype in (DType.bfloat16, DType.float16),
            f"model.attention=cudnn needs model.dtype bfloat16 or float16 (cuDNN flash attention "
            f"has no float32 kernel), got {m.dtype}",
        )
    if m.attention == AttentionKernel.splash:
        _require(
            d.seq_len % 128 == 0,
            f"model.attention=splash needs data.seq_len divisible by 128 (its block size), "
            f"got {d.seq_len}",
        )
    _require(m.logit_chunks >= 1, f"model.logit_chunks={m.logit_chunks} must be at least 1")
    if m.logit_chunks > 1:
        _require(
            m.arch == Arch.decoder,
            "model.logit_chunks chunks the next-token loss of a decoder; an encoder's masked-LM "
            "head has none: set model.logit_chunks=1",
        )
        _require(
            d.seq_len % m.logit_chunks == 0,
            f"model.logit_chunks={m.logit_chunks} must divide data.seq_len={d.seq_len}",
        )


def _validate_optimizer(o: OptimizerConfig, d: DataConfig) -> None:
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
    _require(
        o.decay_steps is None or o.decay_steps > 0,
        f"optimizer.decay_steps={o.decay_steps} must be positive (or null: train.steps)",
    )
    _require(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")


def _validate_train(t: TrainConfig) -> None:
    _require(t.steps > 0, f"train.steps={t.steps} must be positive")
    _require(t.log_every > 0, f"train.log_every={t.log_every} must be positive")
    _require(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0")
    _require(t.spike_factor >= 0, f"train.spike_factor={t.spike_factor} must be >= 0")
    _validate_eval_tasks(t)
    _require(
        t.hang_timeout_s >= 0,
        f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0: automatic; "
        "train.watchdog=false turns the watchdog off)",
    )
    for key in ("hang_allowance_s", "hang_checkpoint_s"):
        _require(getattr(t, key) > 0, f"train.{key}={getattr(t, key)} must be > 0 (seconds)")
    _require(
        not t.profile_steps
        or (len(t.profile_steps) == 2 and 0 <= t.profile_steps[0] < t.profile_steps[1]),
        f"train.profile_steps={t.profile_steps} must be [] or [first, last) with first < last",
    )


def _validate_eval_tasks(t: TrainConfig) -> None:
    """The harness tasks' schedule (their names and files are checked when training starts:
    evaluating a finished run must not need them)."""
    _require(t.eval_tasks_every >= 0, f"train.eval_tasks_every={t.eval_tasks_every} must be >= 0")
    _require(
        t.eval_tasks_limit is None or t.eval_tasks_limit > 0,
        f"train.eval_tasks_limit={t.eval_tasks_limit} must be positive (or null: every example)",
    )


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _require(c.every_steps > 0, f"checkpoint.every_steps={c.every_steps} must be positive")
    _require(c.max_to_keep > 0, f"checkpoint.max_to_keep={c.max_to_keep} must be positive")
    _require(c.keep_every >= 0, f"checkpoint.keep_every={c.keep_every} must be >= 0")
    _require(
        c.host_memory_gb is None or c.host_memory_gb >= 1,
        f"checkpoint.host_memory_gb={c.host_memory_gb} must be at least 1 (or null: no limit)",
    )
    _require(
        c.every_minutes >= 0,
        f"checkpoint.every_minutes={c.every_minutes} must be >= 0 (0: save by steps only)",
    )


def _validate_mesh(cfg: Config) -> None:
    mesh = cfg.mesh
    sizes = mesh.shape()
    for axis, size in sizes.items():
        _require(size == -1 or size > 0, f"mesh.{axis}={size} must be positive or -1 (fill)")
    for axis, size in mesh.dcn_shape().items():
        _require(size > 0, f"mesh.dcn_{axis}={size} must be positive (slices along {axis})")
    _require(
        sum(size == -1 for size in sizes.values()) <= 1,
        "only one of mesh.data, mesh.fsdp, mesh.context, mesh.tensor, mesh.expert may be -1 "
        "(fill with remaining devices)",
    )
    for logical, axes in mesh.rules.items():
        for axis in axes:
            _require(
                axis in MESH_AXES,
                f"mesh.rules.{logical} names mesh axis {axis!r}; the mesh axes are {MESH_AXES}",
            )
    # Divisibility of explicit sizes; -1 axes are checked once the device count is known.
    check_divisibility(cfg, mesh.total_shape())


def _validate_distributed(d: DistributedConfig) -> None:
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
    if m.moe.enabled:
        dims["expert"] = ("model.moe.num_experts", m.moe.num_experts)
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
    # Context parallelism: the mesh axes that split each row (-1 axes: once devices are known).
    row_axes = [a for a in cfg.mesh.rules.get("length", []) if sizes.get(a, 1) > 1]
    context = math.prod(sizes[a] for a in row_axes)
    named = " x ".join(f"mesh.{a}={sizes[a]}" for a in row_axes)
    if context > 1 and d.seq_len % (2 * context):
        raise ConfigError(
            f"{named} needs data.seq_len={d.seq_len} to be a multiple of "
            f"{2 * context} (twice the shards of a row: each shard takes one early and one late "
            "chunk of every row, so that causal attention gives every shard the same work); "
            "change data.seq_len or mesh.context"
        )
    chunk = d.seq_len // max(m.logit_chunks, 1)
    if context > 1 and m.logit_chunks > 1 and chunk % context:
        raise ConfigError(
            f"{named} needs each of model.logit_chunks={m.logit_chunks} chunks of "
            f"data.seq_len={d.seq_len} ({chunk} positions) to split evenly over the row's "
            f"{context} shards; change model.logit_chunks"
        )
    if context > 1 and m.attention == AttentionKernel.splash and d.seq_len % (128 * context):
        raise ConfigError(
            f"model.attention=splash with {named} needs data.seq_len={d.seq_len} "
            f"to be a multiple of {128 * context} (each context shard's queries fill blocks of "
            "128); change data.seq_len or mesh.context"
        )


def _validate_source(src: SourceFields, where: str) -> None:
    _require(
        src.corpus != Corpus.mixture,
        f"{where}.corpus='{src.corpus}' is not python-docs, files, tfds",
    )
    if src.corpus == Corpus.files:
        # Training needs train_files, evaluation eval_files: the pipeline names the missing one.
        _require(
            bool(src.train_files or src.eval_files),
            f"{where}.corpus=files needs {where}.train_files (training) or {where}.eval_files "
            "(evaluation), globs of .txt/.jsonl/.tfrecord",
        )
    if src.corpus == Corpus.tfds:
        _require(bool(src.tfds_name), f"{where}.corpus=tfds needs {where}.tfds_name (e.g. lm1b)")


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    """Data checks that need no files (files and tokenizers are checked by the pipeline)."""
    _require(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
    )
    _require(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be at least 2 (inputs and targets)")
    _require(
        d.global_batch_size > 0, f"data.global_batch_size={d.global_batch_size} must be positive"
    )
    if d.corpus == Corpus.mixture:
        _require(bool(d.mixture), "data.corpus=mixture needs a non-empty data.mixture list")
        for i, component in enumerate(d.mixture):
            where = f"data.mixture[{i}]"
            _validate_source(component, where)
            _require(component.weight > 0, f"{where}.weight={component.weight} must be > 0")
        names = [m.name for m in d.mixture if m.name]
        _require(
            len(names) == len(set(names)),
            f"data.mixture names {names} repeat; give each component its own name",
        )
    else:
        _validate_source(d, "data")
    if d.tokenizer != TokenizerKind.byte:
        _require(
            bool(d.tokenizer_path),
            f"data.tokenizer={d.tokenizer} needs data.tokenizer_path (the model file or "
            "tokenizer.json)",
        )
    _require(d.num_shards >= 0, f"data.num_shards={d.num_shards} must be >= 0 (0: automatic)")
    if d.num_shards:
        _require(
            d.global_batch_size % d.num_shards == 0,
            f"data.num_shards={d.num_shards} does not divide data.global_batch_size="
            f"{d.global_batch_size}; every data shard gives an equal block of rows",
        )
    if d.token_cache:
        _require(
            not d.num_shards,
            f"data.num_shards={d.num_shards} is for the streaming pipeline; with "
            "data.token_cache the data order does not depend on shards (leave num_shards at 0)",
        )
    if d.tokenizer == TokenizerKind.byte:
        _require(
            m.vocab_size >= BYTE_VOCAB_SIZE,
            f"model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's "
            f"{BYTE_VOCAB_SIZE} ids",
        )
