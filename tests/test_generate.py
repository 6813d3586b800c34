"""Generation: the cached decoder against recomputing the full forward pass at every step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.generate import SamplingConfig, filter_logits, generate, next_token
from flaxlm.model import Transformer

PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 65], [256, 10, 20, 30, 40, 50, 60, 70, 80]]


def sample_by_recomputing(
    model: Transformer,
    params,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_id: int | None = None,
) -> list[int]:
    """The oracle: one prompt, the full forward pass over everything at every step.

    The sequence lives in a fixed buffer of the model's context (positions past the end are
    padding, segment 0), so the forward pass compiles once.
    """
    sampling = sampling or SamplingConfig()
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


def _model(tiny_cfg, family, *overrides):
    # A random GPT-2 with tied embeddings mostly repeats its input token; untied, its greedy
    # output varies, so that a wrong cache entry or position would show in the tokens.
    untied = ["model.tie_embeddings=false"] if family == "gpt2" else []
    cfg = tiny_cfg(*untied, *overrides, family=family)
    model = Transformer(cfg.model)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_decoding_equals_recomputing(tiny_cfg, family, scan):
    model, params = _model(tiny_cfg, family, f"model.scan_layers={scan}")
    batched = generate(model, params, PROMPTS, 20, pad_id=258)
    for prompt, got in zip(PROMPTS, batched, strict=True):
        assert got == sample_by_recomputing(model, params, prompt, 20)
        assert got == generate(model, params, [prompt], 20)[0]  # padding changes nothing
        assert len(set(got[len(prompt) :])) > 5  # not a degenerate repetition


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_sampling_equals_recomputing_with_the_same_seed(tiny_cfg, family):
    model, params = _model(tiny_cfg, family)
    for sampling in (
        SamplingConfig(temperature=1.0, seed=3),
        SamplingConfig(temperature=0.8, top_k=5, seed=4),
        SamplingConfig(temperature=1.2, top_p=0.9, seed=5),
    ):
        got = generate(model, params, [PROMPTS[0]], 25, sampling)[0]
        assert got == sample_by_recomputing(model, params, PROMPTS[0], 25, sampling), sampling
    a = generate(model, params, [PROMPTS[0]], 25, SamplingConfig(temperature=1.0, seed=3))
    b = generate(model, params, [PROMPTS[0]], 25, SamplingConfig(temperature=1.0, seed=6))
    assert a != b


def test_filters_keep_the_top_k_and_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    top2 = np.isfinite(np.asarray(filter_logits(logits, 2, 1.0)))[0]
    assert top2.tolist() == [True, True, False, False, False]
    # The nucleus of mass 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 joins; 0.85 >= 0.8 stops there.
    nucleus = np.isfinite(np.asarray(filter_logits(logits, 0, 0.8)))[0]
    assert nucleus.tolist() == [True, True, True, False, False]
    assert np.isfinite(np.asarray(filter_logits(logits, 0, 1e-6)))[0].tolist() == [
        True, False, False, False, False,
    ]  # fmt: skip


def test_stops_after_the_stop_id_and_respects_the_context(tiny_cfg):
    model, params = _model(tiny_cfg, "gpt2")
    free = generate(model, params, [PROMPTS[1]], 10)[0]
    stop = free[4]  # make the 3rd generated token the stop id
    stopped = generate(model, params, [PROMPTS[1]], 10, stop_id=stop)[0]
    assert stopped == free[: free.index(stop, 2) + 1]
    # The context is 64 tokens: a longer request is cut to fit, never overflows.
    assert len(generate(model, params, [[256] * 60], 100)[0]) == 64
    with pytest.raises(ValueError, match="context"):
        generate(model, params, [[256] * 64], 1)
