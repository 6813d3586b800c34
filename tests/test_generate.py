"""Sampling: the jitted decoder against a step-by-step recomputation in Python."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.generate import sample
from flaxlm.model import Transformer


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_matches_argmax_of_the_full_forward_pass(tiny_cfg, family):
    cfg = tiny_cfg(family=family)
    model = Transformer(cfg.model)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    prompt = [256, 72, 101, 108, 108, 111]
    got = sample(model, params, prompt, 12, temperature=0.0)
    expected = list(prompt)
    for _ in range(12):
        logits = model.apply({"params": params}, jnp.asarray([expected], jnp.int32))
        expected.append(int(jnp.argmax(logits[0, -1])))
    assert got == expected


def test_sampling_is_seeded_and_respects_the_context(tiny_cfg):
    cfg = tiny_cfg()
    model = Transformer(cfg.model)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    a = sample(model, params, [256, 65], 20, temperature=1.0, seed=3)
    b = sample(model, params, [256, 65], 20, temperature=1.0, seed=3)
    c = sample(model, params, [256, 65], 20, temperature=1.0, seed=4)
    assert a == b and a != c
    # The context is 64 tokens: a longer request is cut to fit, never overflows.
    long = sample(model, params, [256] * 60, 100, temperature=1.0)
    assert len(long) == 64
    with pytest.raises(ValueError, match="context"):
        sample(model, params, [256] * 64, 1)


def test_stops_after_the_stop_id(tiny_cfg):
    cfg = tiny_cfg()
    model = Transformer(cfg.model)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    free = sample(model, params, [256, 65], 10)
    stop = free[4]  # make the 3rd generated token the stop id
    stopped = sample(model, params, [256, 65], 10, stop_id=stop)
    assert stopped == free[: free.index(stop, 2) + 1]
    assert np.all(np.asarray(stopped[:-1][2:]) != stop)
