"""Parameter counts: the analytic formula, the initialised model, and the published sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import CONFIGS

from flaxlm import config
from flaxlm.flops import analytic_param_count, flops_per_token, param_count
from flaxlm.model import Transformer

PUBLISHED = {
    "gpt2-124m": 124_439_808,
    "gpt2-355m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1.5b": 1_557_611_200,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
    "gemma2-2b": 2_614_341_888,
    # BertForMaskedLM's own count (transformers), without the pooler and next-sentence head.
    "bert-base-uncased": 109_514_298,
    "bert-large-uncased": 335_174_458,
}


def _preset(name: str, *overrides: str):
    return config.load(CONFIGS / "models" / f"{name}.yaml", ["data.seq_len=8", *overrides])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_their_published_size(name):
    cfg = _preset(name)
    # eval_shape traces init without allocating: a 70B model costs nothing here.
    shapes = jax.eval_shape(
        lambda: Transformer(cfg.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    )
    assert param_count(shapes) == analytic_param_count(cfg.model) == PUBLISHED[name]


@pytest.mark.parametrize("family", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("scan", [False, True])
def test_analytic_count_matches_the_model_for_every_option(family, scan):
    for extra in (
        [],
        ["model.tie_embeddings=false"],
        ["model.position=sinusoidal"],
        ["model.use_bias=true"],
        ["model.use_bias=false", "model.qkv_bias=true", "model.qk_norm=true"],
    ):
        cfg = _preset(family, f"model.scan_layers={scan}", *extra)
        shapes = jax.eval_shape(
            lambda c=cfg: Transformer(c.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        )
        assert param_count(shapes) == analytic_param_count(cfg.model), extra


def test_analytic_count_matches_the_encoder_model():
    for extra in ([], ["model.type_vocab_size=3", "model.vocab_size=384"]):
        cfg = _preset("bert-tiny", *extra)
        shapes = jax.eval_shape(
            lambda c=cfg: Transformer(c.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        )
        assert param_count(shapes) == analytic_param_count(cfg.model), extra


def test_flops_per_token_of_the_reference_benchmark_config():
    # GPT-2 shape, 6 layers, d 512, 8 heads, ff 2048, vocab 8192, context 256: 23,240,704
    # parameters and 6N + 12 L T d = 148.9 M FLOPs per token (numbers from the benchmark issue).
    cfg = config.load(
        CONFIGS / "models" / "gpt2-tiny.yaml",
        ["model.vocab_size=8192", "model.d_model=512", "model.n_layers=6", "model.n_heads=8",
         "model.d_ff=2048", "model.max_seq_len=256", "data.seq_len=256"],
    )  # fmt: skip
    n = analytic_param_count(cfg.model)
    assert n == 23_240_704
    assert flops_per_token(cfg.model, n, 256) == pytest.approx(148.9e6, rel=1e-3)
