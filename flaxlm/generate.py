"""Text generation: prefill + incremental decoding with a key/value cache, and sampling.

`generate` left-pads a batch of prompts of different lengths to a common length (padding is
segment 0, never attended to; positions start at 0 at each prompt's first token), prefills the
cache with all of them in one forward pass, then produces one token per step for every row,
attending to the cache instead of recomputing the prefix. Sampling is greedy at temperature 0,
otherwise softmax(logits / T) restricted to the top-k tokens and/or the top-p nucleus, with a
seeded key. A row stops after its stop id; the loop stops when every row has.

`left_pad_prompts` (on the host) and `prefill_and_decode` (jitted) are the two halves of `generate`,
public for benchmarks that time the decoder alone. `generate_text` is the text-in, text-out form
that the command line and the training run's sample use. Names carry their shapes (letters as in
`flaxlm.model`; here T is the padded prompt width and M the number of new tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import Arch, ConfigError, ModelConfig
from flaxlm.data.tokenizer import ByteTokenizer, Tokenizer
from flaxlm.model import Transformer

if TYPE_CHECKING:
    from flaxlm.train import Trainer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k restriction
    top_p: float = 1.0  # 1: no nucleus restriction
    seed: int = 0


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf (last axis)."""
    if top_k > 0:
        kth_Bx1 = jnp.sort(logits_BxV, axis=-1)[..., -top_k][..., None]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        order_BxV = jnp.argsort(-logits_BxV, axis=-1)
        sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV >= top_p
        sorted_BxV = jnp.where(outside_BxV, -jnp.inf, sorted_BxV)
        logits_BxV = (
            jnp.full_like(logits_BxV, -jnp.inf)
            .at[jnp.arange(logits_BxV.shape[0])[:, None], order_BxV]
            .set(sorted_BxV)
        )
    return logits_BxV


def next_token(logits_BxV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """token_B: one token per row from float32 logits_BxV."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(logits_BxV / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def left_pad_prompts(
    prompts: list[list[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens_BxT, positions_BxT, segments_BxT) of the prompts right-aligned to the longest
    (or to `width`, when wider: a fixed width reuses one compiled decoder).

    Padding is segment 0 (never attended to); positions count from each prompt's first token.
    """
    width = max(max(len(p) for p in prompts), width or 0)
    tokens_BxT = np.full((len(prompts), width), pad_id, np.int32)
    segments_BxT = np.zeros((len(prompts), width), np.int32)
    positions_BxT = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        tokens_BxT[row, pad:] = prompt
        segments_BxT[row, pad:] = 1
        positions_BxT[row, pad:] = np.arange(len(prompt))
    return tokens_BxT, positions_BxT, segments_BxT


def generate(
    model: Transformer,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    stop_id: int | None = None,
    pad_id: int = 0,
    pad_to: int | None = None,
) -> list[list[int]]:
    """Returns, for each prompt, the prompt followed by its generated tokens (through stop_id)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (for example BOS)")
    context = model.cfg.max_seq_len
    width = max(max(len(p) for p in prompts), pad_to or 0)
    if width >= context:
        raise ValueError(f"a prompt has {width} tokens; the model's context is {context}")
    max_new_tokens = max(0, min(max_new_tokens, context - width))
    tokens_BxT, positions_BxT, segments_BxT = left_pad_prompts(prompts, pad_id, width)
    out_BxM = prefill_and_decode(
        Transformer(model.cfg, decode=True),
        params,
        jnp.asarray(tokens_BxT),
        jnp.asarray(positions_BxT),
        jnp.asarray(segments_BxT),
        jnp.asarray([len(p) for p in prompts], jnp.int32),
        max_new_tokens,
        sampling,
        -1 if stop_id is None else stop_id,
        jax.random.key(sampling.seed),
    )
    out_BxM = np.asarray(jax.device_get(out_BxM))
    results = []
    for row, prompt in enumerate(prompts):
        new = [int(t) for t in out_BxM[row]]
        if stop_id is not None and stop_id in new:
            new = new[: new.index(stop_id) + 1]
        results.append(list(prompt) + new)
    return results


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def prefill_and_decode(
    model: Transformer,
    params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    segments_BxT: jax.Array,
    lengths_B: jax.Array,
    steps: int,
    sampling: SamplingConfig,
    stop_id: int,
    key: jax.Array,
) -> jax.Array:
    """out_BxM, M = steps new tokens per row: one prefill of the left-padded prompts, then one
    cached step per token (`model` has decode=True; stop_id < 0: none). Rows that stopped
    keep emitting stop_id."""
    batch, width = tokens_BxT.shape
    if steps == 0:
        return jnp.zeros((batch, 0), jnp.int32)
    # The cache holds the padded prompt and every new token: S = T + M.
    cache_shape = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch, width + steps), jnp.int32))
    )["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shape)

    prompt_BxT = (tokens_BxT, positions_BxT, segments_BxT)
    logits_BxTxV, variables = model.apply(
        {"params": params, "cache": cache}, *prompt_BxT, mutable=["cache"]
    )
    key, sub = jax.random.split(key)
    first_B = next_token(logits_BxTxV[:, -1], sub, sampling)
    out_BxM = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(first_B)
    done_B = first_B == stop_id

    def cond(carry):
        i, _, _, done_B, _ = carry
        return (i < steps) & ~jnp.all(done_B)

    def body(carry):
        i, cache, out_BxM, done_B, key = carry
        last_Bx1 = out_BxM[:, i - 1][:, None]
        position_Bx1 = (lengths_B + i - 1)[:, None]
        logits_Bx1xV, variables = model.apply(
            {"params": params, "cache": cache},
            last_Bx1,
            position_Bx1,
            jnp.ones_like(last_Bx1),
            mutable=["cache"],
        )
        key, sub = jax.random.split(key)
        token_B = next_token(logits_Bx1xV[:, -1], sub, sampling)
        # Rows that already stopped keep emitting stop ids (trimmed on the host).
        token_B = jnp.where(done_B, stop_id if stop_id >= 0 else 0, token_B)
        out_BxM = out_BxM.at[:, i].set(token_B)
        return i + 1, variables["cache"], out_BxM, done_B | (token_B == stop_id), key

    carry = (1, variables["cache"], out_BxM, done_B, key)
    _, _, out_BxM, _, _ = jax.lax.while_loop(cond, body, carry)
    return out_BxM


def check_decoder(cfg: ModelConfig) -> None:
    """Refuses an encoder: it sees every token at once and has no next-token logits to sample."""
    if cfg.arch != Arch.decoder:
        raise ConfigError(
            f"model.arch={cfg.arch}: an encoder (BERT) predicts masked tokens and cannot "
            "continue text; use `flaxlm fill-mask --checkpoint RUN --text '... [MASK] ...'`"
        )


def check_room(
    trainer: Trainer,
    prompts: list[str],
    new_tokens: int | None,
    tokenizer: Tokenizer | None = None,
    default: int = 100,
) -> int:
    """The number of tokens to generate: new_tokens, or for None the default clipped to the
    room the longest prompt leaves. Refuses (ConfigError) prompts that leave no room and an
    explicit new_tokens past the model's context, rather than clipping it silently."""
    check_decoder(trainer.cfg.model)
    context = trainer.cfg.model.max_seq_len
    if new_tokens is not None and new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={new_tokens} must be >= 0")
    tok = tokenizer or ByteTokenizer()
    longest = max(len(tok.encode(p, add_bos=trainer.cfg.data.add_bos)) for p in prompts)
    if longest >= context:
        raise ConfigError(
            f"a prompt is {longest} tokens long; the model's context (model.max_seq_len) is "
            f"{context} tokens: shorten the prompt to at most {context - 1} tokens"
        )
    if new_tokens is None:
        return min(default, context - longest)
    if longest + new_tokens > context:
        raise ConfigError(
            f"--max-new-tokens={new_tokens} after a {longest}-token prompt goes past the model's "
            f"context of {context} tokens (model.max_seq_len); use --max-new-tokens "
            f"{context - longest} or less, or a shorter prompt"
        )
    return new_tokens


def generate_text(
    trainer: Trainer,
    params,
    prompts: list[str],
    new_tokens: int,
    sampling: SamplingConfig,
    stop_strings: tuple[str, ...] = (),
    tokenizer: Tokenizer | None = None,
) -> list[str]:
    """Continues each prompt; a text ends at EOS or just after the first stop string."""
    check_decoder(trainer.cfg.model)
    tok = tokenizer or ByteTokenizer()
    ids = [tok.encode(p, add_bos=trainer.cfg.data.add_bos) for p in prompts]
    with trainer.context():
        out = generate(
            trainer.model, params, ids, new_tokens, sampling, stop_id=tok.eos_id, pad_id=tok.pad_id
        )
    texts = []
    for prompt, row in zip(prompts, out, strict=True):
        text = tok.decode(row)
        # Stop strings count only in the continuation, after the prompt as the tokenizer decodes it.
        start = len(tok.decode(tok.encode(prompt, add_bos=trainer.cfg.data.add_bos)))
        cut = [text.find(s, start) + len(s) for s in stop_strings if s in text[start:]]
        texts.append(text[: min(cut)] if cut else text)
    return texts
