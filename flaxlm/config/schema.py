"""The config schema: frozen dataclasses for each section (their choices are the enums of
`flaxlm.config.enums`).

Comments beside each field say what it means; `flaxlm.config.validation` checks what types
alone cannot, and `flaxlm.config.loading` fills the tree from YAML files and overrides.
"""

from __future__ import annotations

import dataclasses

from flaxlm.config.enums import (
    Arch,
    AttentionKernel,
    Corpus,
    Decay,
    DistributedInit,
    DType,
    Mlp,
    NanPolicy,
    Norm,
    Objective,
    OptimizerName,
    Packing,
    Position,
    Remat,
    RopeScaling,
    SpikePolicy,
    TokenizerKind,
)
from flaxlm.config.moe import MoeConfig
from flaxlm.config.trackers import WandbConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # decoder: causal, pre-norm (GPT-2, Llama, ...); encoder: bidirectional, post-norm, with
    # token-type embeddings and a masked-LM head (BERT; flaxlm/encoder.py).
    arch: Arch = Arch.decoder
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
    # Encoders: rows of the token-type (segment A/B) embedding table.
    type_vocab_size: int = 2
    norm: Norm = Norm.layernorm
    norm_eps: float = 1e-5
    mlp: Mlp = Mlp.gelu
    position: Position = Position.learned
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling.none
    rope_scaling_factor: float = 8.0  # llama3, linear, yarn: how much longer the context gets
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_len: int = 8192  # llama3, yarn: the context the model was trained at
    # yarn: rotations per original context that bound the interpolated (slow) and kept (fast)
    # frequency ranges, and the factor on cos/sin (null: 0.1 ln(factor) + 1, as in the paper).
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_attention_factor: float | None = None
    tie_embeddings: bool = True
    use_bias: bool = True
    # Biases on the query/key/value projections only (Qwen2); use_bias puts them everywhere.
    qkv_bias: bool = False
    # RMSNorm over each query and key head before the rotary embedding (Qwen3).
    qk_norm: bool = False
    # Each token attends to itself and the sliding_window - 1 tokens before it (Mistral);
    # None: the whole causal prefix. Decoding then keeps a ring buffer of that many positions.
    sliding_window: int | None = None
    # Dropout rates, active only in training (eval and generation are deterministic): on the
    # embeddings, on the attention probabilities, and on each residual branch's output.
    # With a sliding window: every global_every-th layer (layers k-1, 2k-1, ...) attends to the
    # whole prefix, the others through the window (Gemma 2: 2); 0: every layer uses the window.
    global_every: int = 0
    # Gemma: RMSNorm multiplies by (1 + scale) (scales start at 0); embeddings are multiplied by
    # sqrt(d_model); each residual branch's output is normalised too (post_norms); attention
    # logits are scaled by 1/sqrt(query_scale) instead of 1/sqrt(head_dim) and soft-capped as
    # cap * tanh(x / cap), like the output logits (None: no cap).
    norm_scale_offset: bool = False
    embed_scale: bool = False
    post_norms: bool = False
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Training and evaluation compute the output projection and the loss this many chunks of
    # positions at a time (a scan; the backward pass recomputes each chunk's logits), so a step
    # holds about 1/logit_chunks of the logits and their gradient; 1: all at once. Must divide
    # data.seq_len (flaxlm/output_head.py).
    logit_chunks: int = 1
    dropout_embed: float = 0.0
    dropout_attn: float = 0.0
    dropout_residual: float = 0.0
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
    dtype: DType = DType.float32
    param_dtype: DType = DType.float32
    init_std: float = 0.02
    # Mixture-of-experts feed-forward blocks (flaxlm/config/moe.py); dense when num_experts=0.
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


def _default_rules() -> dict[str, list[str]]:
    # Logical axis -> mesh axes. Parameters: `embed` is split over fsdp and context (ZeRO-3), the
    # head / mlp / vocab dimensions over tensor (Megatron style). Activations: the batch over
    # data and fsdp, their feature dimensions over tensor where the matching weights are.
    return {
        "batch": ["data", "fsdp", "expert"],
        # The sequence of activations: context parallelism (flaxlm/context_parallel.py).
        "length": ["context"],
        "vocab": ["tensor"],
        # FSDP over the context axis too: its devices share rows, not the model.
        "embed": ["fsdp", "context"],
        "heads": ["tensor"],
        "kv_heads": ["tensor"],
        "head_dim": [],
        "mlp": ["tensor"],
        "layers": [],
        # Routed experts' weights: expert parallelism (tokens travel to them by all-to-all).
        "expert": ["expert"],
        "act_embed": [],
        "act_heads": ["tensor"],
        "act_kv_heads": ["tensor"],
        "act_mlp": ["tensor"],
        "act_vocab": ["tensor"],
    }


MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Devices along each mesh axis within a slice (ICI: the fast interconnect of one TPU slice,
    # or the NVLink domain of one GPU host); at most one may be -1 (fill with the remaining
    # devices of the slice).
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Expert parallelism: routed experts are split over this axis, and so is the batch (each
    # device routes its own tokens, then an all-to-all brings them to their experts' devices).
    expert: int = 1
    # Context parallelism: each sequence is split over this axis (activations, attention
    # queries); keys and values are all-gathered per layer. For long sequences whose
    # activations do not fit on one device (flaxlm/context_parallel.py).
    context: int = 1
    # Slices along each mesh axis (DCN: the data-center network between TPU slices, or between
    # hosts when each process is its own slice). The product is the number of slices; a mesh
    # axis spans ici x dcn devices, with the DCN part outermost. Put only `data` (or `fsdp`)
    # across DCN: it carries one gradient all-reduce per step, not per-layer traffic.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_expert: int = 1
    dcn_context: int = 1
    rules: dict[str, list[str]] = dataclasses.field(default_factory=_default_rules)

    def shape(self) -> dict[str, int]:
        """The ICI (per-slice) sizes; -1 marks the axis that fills the slice."""
        return {
            "data": self.data,
            "fsdp": self.fsdp,
            "context": self.context,
            "tensor": self.tensor,
            "expert": self.expert,
        }

    def dcn_shape(self) -> dict[str, int]:
        return {
            "data": self.dcn_data,
            "fsdp": self.dcn_fsdp,
            "context": self.dcn_context,
            "tensor": self.dcn_tensor,
            "expert": self.dcn_expert,
        }

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
class SourceFields:
    """Where documents come from (see flaxlm/data/sources.py); shared by DataConfig and the
    components of its mixture.

    "python-docs" builds the default corpus from text shipped with the Python interpreter;
    "files" reads train_files / eval_files (globs of .txt, .jsonl with a `text_field`, or
    TFRecord files of tf.train.Example with a bytes feature `text_field`; local or gs://);
    "tfds" reads the TFDS dataset tfds_name (e.g. lm1b, c4/en, tiny_shakespeare) prepared under
    tfds_data_dir, splits train_split / eval_split; "mixture" (DataConfig only) samples the
    sources of `mixture` by weight.
    """

    corpus: Corpus = Corpus.python_docs
    train_files: str | None = None
    eval_files: str | None = None
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"


@dataclasses.dataclass(frozen=True)
class SourceConfig(SourceFields):
    """One component of data.mixture: a source and its weight."""

    # Relative sampling weight of this component's documents (normalised over the mixture).
    weight: float = 1.0
    # Its name in the per-domain eval metrics (eval_loss/<name>); default: the TFDS name, the
    # corpus, or the train files' name.
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig(SourceFields):
    mixture: list[SourceConfig] = dataclasses.field(default_factory=list)
    # Where built-in corpora are written (once) before tf.data reads them.
    cache_dir: str = "~/.cache/flaxlm"
    # "byte" (ids 0..255 + BOS/EOS/PAD), "sentencepiece" (a .model file at tokenizer_path; train
    # one with `flaxlm tokenizer train`) or "hf" (a tokenizer.json or its directory).
    tokenizer: TokenizerKind = TokenizerKind.byte
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
    packing: Packing = Packing.documents
    # Data shards V: independent, seeded, checkpointable streams whose row-blocks make up the
    # global batch in shard order. 0: the process count of the run that first starts (the value
    # used is saved with every checkpoint). Must be a multiple of the process count.
    num_shards: int = 0
    # A token cache written by `flaxlm data tokenize` (local or gs://). When set, training reads
    # its rows by index (flaxlm/data/indexed.py): a run resumes on any process count that
    # divides the global batch, and its saved data position is a few integers. Unset: the
    # streaming tf.data pipeline (any source, nothing to build first; data shards as above).
    token_cache: str | None = None
    # Evaluation uses this many global batches of the eval split, always the same ones.
    eval_batches: int = 4
    # train.objective=mlm: the share of tokens chosen for prediction (BERT: 15%); of those, 80%
    # become [MASK], 10% a random token and 10% stay (flaxlm/data/masking.py).
    mask_rate: float = 0.15


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: Decay = Decay.cosine
    # The schedule's horizon: the step at which it reaches its floor (None: train.steps, fixed
    # when the run starts and saved with it, so that raising train.steps on resume continues at
    # the floor instead of stretching the schedule mid-run).
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    # wsd only: the fraction of the horizon (decay_steps) spent decaying at the end.
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
    # Also save once this many minutes have passed since the last save (0: by steps only).
    every_minutes: float = 0.0
    # At most this many GB of arrays in host memory at once while saving or restoring (Orbax's
    # concurrency limits; None: Orbax's default, 96). A host with little memory beside large
    # parameters sets it low; `flaxlm convert` uses 1.
    host_memory_gb: int | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # clm: next-token prediction (decoders); mlm: masked-token prediction (model.arch=encoder).
    objective: Objective = Objective.clm
    steps: int = 1000
    run_dir: str = "runs/default"
    # Start a new run from the parameters of another run directory, an export or an imported
    # model (fresh optimizer, step 0); init_from_step picks its checkpoint (None: the latest).
    init_from: str | None = None
    init_from_step: int | None = None
    seed: int = 0
    log_every: int = 10
    # 0 disables periodic evaluation (the run still evaluates at the start and the end).
    eval_every: int = 100
    # lm-evaluation-harness tasks run on the training parameters (pip install flaxlm[harness]):
    # task names, or paths of local task YAML files or directories of them (offline). They run
    # every eval_tasks_every steps and at the last step (0: only at the last step), on the
    # first eval_tasks_limit examples of each task (None: all).
    eval_tasks: list[str] = dataclasses.field(default_factory=list)
    eval_tasks_every: int = 0
    eval_tasks_limit: int | None = None
    # Peak FLOP/s of one device for MFU; None uses a known table or measures a matmul on CPU.
    peak_flops_per_device: float | None = None
    progress_bar: bool = True
    tensorboard: bool = True
    # What a NaN or Inf in the loss or gradients does (detected on device at every step).
    nan_policy: NanPolicy = NanPolicy.stop
    # A loss above spike_factor x its running average is logged as a spike (0 disables).
    spike_factor: float = 1.5
    # What a spike does: log it, or restore the last checkpoint and leave out its data.
    on_spike: SpikePolicy = SpikePolicy.log
    # [first, last): record a profiler trace of these steps under run_dir/profile ([] = none).
    profile_steps: list[int] = dataclasses.field(default_factory=list)
    # Printed after training: a continuation of this prompt (None or "" skips it).
    sample_prompt: str | None = "Once upon a time"
    sample_new_tokens: int = 200
    sample_temperature: float = 0.8
    # The hang watchdog ends a run that makes no step for hang_timeout_s (0: 20 median steps,
    # at least 300 s), for hang_allowance_s while starting, restoring, compiling, evaluating or
    # closing down, or for hang_checkpoint_s while blocked by a checkpoint save.
    watchdog: bool = True
    hang_timeout_s: float = 0.0
    hang_allowance_s: float = 1800.0
    hang_checkpoint_s: float = 1800.0
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
