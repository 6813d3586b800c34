"""The enums of config choices (str enums: YAML and overrides spell them as plain strings), and
the error type every config problem raises."""

from __future__ import annotations

import enum


class ConfigError(ValueError):
    """A config that cannot work; the message names the key, the value and the rule."""


class Norm(enum.StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Mlp(enum.StrEnum):
    gelu = "gelu"  # GPT-2: the tanh approximation of GELU
    gelu_exact = "gelu_exact"  # BERT: the exact (erf) GELU
    swiglu = "swiglu"
    geglu = "geglu"  # Gemma: down(gelu_tanh(gate(x)) * up(x))


class Arch(enum.StrEnum):
    """The shape of the stack: which tokens see which, and what the logits predict."""

    decoder = "decoder"  # causal attention, pre-norm blocks, next-token logits (GPT-2, Llama)
    # bidirectional attention (padding mask only), post-norm blocks, token-type embeddings and
    # the masked-LM head (BERT)
    encoder = "encoder"


class Objective(enum.StrEnum):
    clm = "clm"  # causal language modelling: predict each next token (decoders)
    mlm = "mlm"  # masked language modelling: predict the masked tokens (encoders)


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
    linear = "linear"  # position interpolation: every frequency divided by the factor
    yarn = "yarn"  # YaRN: interpolate low frequencies, keep high ones, scale the attention


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
    # cosine from the peak to min_lr_ratio x peak at optimizer.decay_steps (default train.steps)
    cosine = "cosine"
    linear = "linear"  # straight line from the peak to min_lr_ratio x peak
    wsd = "wsd"  # warmup-stable-decay: the peak, then linear decay over the last decay_fraction
    constant = "constant"


class NanPolicy(enum.StrEnum):
    stop = "stop"  # stop the run, naming the step and the last good checkpoint
    skip = "skip"  # drop that update (params and optimizer state unchanged) and count it


class SpikePolicy(enum.StrEnum):
    log = "log"  # log the spike and train on
    skip = "skip"  # restore the last checkpoint; train on without the spiking step's batch
    rollback = "rollback"  # restore it; leave out every batch from it to the spike


class WandbMode(enum.StrEnum):
    online = "online"  # sync to the W&B server while training
    offline = "offline"  # write under RUN_DIR/wandb; `wandb sync` uploads it later
    disabled = "disabled"


class DType(enum.StrEnum):
    """A floating-point dtype, by its NumPy/JAX name (`jnp.dtype(DType.bfloat16)` works)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Corpus(enum.StrEnum):
    python_docs = "python-docs"  # text shipped with the Python interpreter (offline default)
    files = "files"  # train_files / eval_files globs
    tfds = "tfds"  # a prepared TFDS dataset
    mixture = "mixture"  # DataConfig only: the sources of data.mixture, sampled by weight


class TokenizerKind(enum.StrEnum):
    byte = "byte"  # ids 0..255 are the bytes; BOS, EOS and PAD follow (BYTE_VOCAB_SIZE ids)
    sentencepiece = "sentencepiece"  # a .model file at data.tokenizer_path
    hf = "hf"  # a Hugging Face tokenizer.json (or its directory) at data.tokenizer_path


class Packing(enum.StrEnum):
    documents = "documents"  # whole documents end to end, attention kept within each
    concat = "concat"  # plain concatenate and chunk: one segment per row


# Ids of the byte tokenizer (flaxlm.data.tokenizer.ByteTokenizer): the 256 byte values, then
# BOS, EOS and PAD. It lives here so that validation can check model.vocab_size against it
# without the config package importing the data package.
BYTE_VOCAB_SIZE = 259
# The masked-LM runs of the byte tokenizer also use the id after PAD as [MASK] (BOS and EOS
# play [CLS] and [SEP]): their model.vocab_size must reach beyond it.
BYTE_MASK_ID = BYTE_VOCAB_SIZE


class DistributedInit(enum.StrEnum):
    auto = "auto"  # join when the environment or coordinator_address describes a multi-process job
    always = "always"  # always call jax.distributed.initialize (it reads the environment)
    never = "never"


class Router(enum.StrEnum):
    """How a mixture-of-experts router turns its logits into the gates of the chosen experts."""

    topk_softmax = "topk_softmax"  # Mixtral: top-k logits, softmax over those k
    softmax_topk = "softmax_topk"  # DeepSeek, Qwen-MoE: softmax over all experts, keep the top k


class MoeDispatch(enum.StrEnum):
    """How tokens reach their experts."""

    dropless = "dropless"  # sort by expert, grouped matmul (jax.lax.ragged_dot): nothing dropped
    capacity = "capacity"  # one-hot einsum into fixed per-expert buffers: the simple reference
