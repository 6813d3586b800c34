"""Text generation: prefill + incremental decoding with a key/value cache, and sampling.

`generate` left-pads a batch of prompts of different lengths to a common length (padding is
segment 0, never attended to; positions start at 0 at each prompt's first token), prefills the
cache with all of them in one forward pass, then produces one token per step for every row,
attending to the cache instead of recomputing the prefix. Sampling is greedy at temperature 0,
otherwise softmax(logits / T) restricted to the top-k tokens and/or the top-p nucleus, with a
seeded key. A row stops after its stop id; the loop stops when every row has.

`sample_by_recomputing` runs the full forward pass over the whole sequence at every step. It is
slow and simple: the oracle the cached decoder is tested against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.model import Transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k restriction
    top_p: float = 1.0  # 1: no nucleus restriction
    seed: int = 0


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf (last axis)."""
    if top_k > 0:
        kth = jnp.sort(logits, axis=-1)[..., -top_k][..., None]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = jnp.cumsum(probs, axis=-1) - probs >= top_p
        sorted_logits = jnp.where(outside, -jnp.inf, sorted_logits)
        logits = (
            jnp.full_like(logits, -jnp.inf)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(sorted_logits)
        )
    return logits


def next_token(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row from float32 logits (B, V)."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    positions = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        tokens[row, pad:] = prompt
        segments[row, pad:] = 1
        positions[row, pad:] = np.arange(len(prompt))
    return tokens, positions, segments


def generate(
    model: Transformer,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    stop_id: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Returns, for each prompt, the prompt followed by its generated tokens (through stop_id)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (for example BOS)")
    context = model.cfg.max_seq_len
    width = max(len(p) for p in prompts)
    if width >= context:
        raise ValueError(f"a prompt has {width} tokens; the model's context is {context}")
    max_new_tokens = max(0, min(max_new_tokens, context - width))
    tokens, positions, segments = _left_pad(prompts, pad_id)
    out = _decode(
        Transformer(model.cfg, decode=True),
        params,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        jnp.asarray(segments),
        jnp.asarray([len(p) for p in prompts], jnp.int32),
        max_new_tokens,
        sampling,
        -1 if stop_id is None else stop_id,
        jax.random.key(sampling.seed),
    )
    out = np.asarray(jax.device_get(out))
    results = []
    for row, prompt in enumerate(prompts):
        new = [int(t) for t in out[row]]
        if stop_id is not None and stop_id in new:
            new = new[: new.index(stop_id) + 1]
        results.append(list(prompt) + new)
    return results


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _decode(model, params, tokens, positions, segments, lengths, steps, sampling, stop_id, key):
    batch, width = tokens.shape
    if steps == 0:
        return jnp.zeros((batch, 0), jnp.int32)
    # The cache holds the padded prompt and every new token.
    cache_shape = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch, width + steps), jnp.int32))
    )["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shape)

    logits, variables = model.apply(
        {"params": params, "cache": cache}, tokens, positions, segments, mutable=["cache"]
    )
    key, sub = jax.random.split(key)
    first = next_token(logits[:, -1], sub, sampling)
    out = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(first)
    done = first == stop_id

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, cache, out, done, key = carry
        last = out[:, i - 1][:, None]
        position = (lengths + i - 1)[:, None]
        logits, variables = model.apply(
            {"params": params, "cache": cache},
            last,
            position,
            jnp.ones_like(last),
            mutable=["cache"],
        )
        key, sub = jax.random.split(key)
        token = next_token(logits[:, -1], sub, sampling)
        # Rows that already stopped keep emitting stop ids (trimmed on the host).
        token = jnp.where(done, stop_id if stop_id >= 0 else 0, token)
        return i + 1, variables["cache"], out.at[:, i].set(token), done | (token == stop_id), key

    _, _, out, _, _ = jax.lax.while_loop(cond, body, (1, variables["cache"], out, done, key))
    return out


def sample_by_recomputing(
    model: Transformer,
    params,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_id: int | None = None,
) -> list[int]:
    """The oracle: one prompt, the full forward pass over everything at every step.

    The sequence lives in a fixed buffer of the model's context (positions past the end are
    padding, segment 0), so the forward pass compiles once.
    """
    context = model.cfg.max_seq_len
    tokens = list(prompt)
    key = jax.random.key(sampling.seed)
    forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, None, s))
    for _ in range(min(max_new_tokens, context - len(prompt))):
        buffer = np.zeros((1, context), np.int32)
        buffer[0, : len(tokens)] = tokens
        segments = (np.arange(context) < len(tokens)).astype(np.int32)[None]
        logits = forward(params, buffer, segments)[:, len(tokens) - 1]
        key, sub = jax.random.split(key)
        tokens.append(int(next_token(logits, sub, sampling)[0]))
        if tokens[-1] == stop_id:
            break
    return tokens
