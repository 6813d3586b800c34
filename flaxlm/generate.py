"""Sampling a continuation of a prompt (greedy or with temperature).

This first version recomputes the forward pass over a fixed-size buffer at every step (one
compilation for any prompt length); it is the oracle a KV-cache decoder must match.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxlm.model import Transformer


def sample(
    model: Transformer,
    params,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Returns prompt + up to max_new_tokens sampled ids (stops after stop_id)."""
    length = model.cfg.max_seq_len
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token (for example BOS)")
    if len(prompt) >= length:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {length}")
    max_new_tokens = min(max_new_tokens, length - len(prompt))
    buffer = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
    tokens = _decode(
        model,
        params,
        buffer,
        jnp.int32(len(prompt)),
        max_new_tokens,
        jnp.float32(temperature),
        jax.random.key(seed),
    )
    out = [int(t) for t in jax.device_get(tokens)[0, : len(prompt) + max_new_tokens]]
    if stop_id is not None and stop_id in out[len(prompt) :]:
        out = out[: out.index(stop_id, len(prompt)) + 1]
    return out


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode(model, params, buffer, start, steps, temperature, key):
    length = buffer.shape[1]
    positions = jnp.arange(length)[None]

    def body(i, carry):
        buffer, key = carry
        cur = start + i
        # Tokens at and after `cur` are padding (segment 0) and causally invisible anyway.
        segments = (positions < cur).astype(jnp.int32)
        logits = model.apply({"params": params}, buffer, positions, segments)[0, cur - 1]
        key, sub = jax.random.split(key)
        greedy = jnp.argmax(logits)
        sampled = jax.random.categorical(sub, logits / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
        return buffer.at[0, cur].set(token), key

    buffer, _ = jax.lax.fori_loop(0, steps, body, (buffer, key))
    return buffer
