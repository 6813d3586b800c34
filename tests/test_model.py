"""The Transformer: causality, packing, positional encodings and logical axis names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.config import ModelConfig
from flaxlm.model import Transformer
from flaxlm.positions import apply_rope, rope_frequencies, sinusoidal_encoding

FAMILIES = ["gpt2", "llama"]


def _model_and_params(cfg):
    model = Transformer(cfg.model)
    tokens = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    return model, params


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_changing_token_t_never_changes_earlier_logits(tiny_cfg, family, position):
    cfg = tiny_cfg(f"model.position={position}", family=family)
    model, params = _model_and_params(cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (1, 32)).astype(np.int32)
    base = model.apply({"params": params}, tokens)
    for t in (0, 7, 31):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1) % 256
        out = model.apply({"params": params}, changed)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        # ... and it does change the logits at t (the test could fail).
        assert not np.allclose(np.asarray(out[:, t]), np.asarray(base[:, t]))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_do_not_see_each_other(tiny_cfg, family):
    """Two documents packed in one row give the logits each gives alone."""
    cfg = tiny_cfg(family=family)
    model, params = _model_and_params(cfg)
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(0, 256, 12), rng.integers(0, 256, 20)
    packed = np.concatenate([doc_a, doc_b])[None].astype(np.int32)
    positions = np.concatenate([np.arange(12), np.arange(20)])[None]
    segments = np.concatenate([np.ones(12), 2 * np.ones(20)])[None].astype(np.int32)
    out = np.asarray(model.apply({"params": params}, packed, positions, segments))
    alone_a = np.asarray(model.apply({"params": params}, doc_a[None].astype(np.int32)))
    alone_b = np.asarray(model.apply({"params": params}, doc_b[None].astype(np.int32)))
    np.testing.assert_allclose(out[0, :12], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 12:], alone_b[0], atol=1e-5)


def test_every_parameter_has_logical_axis_names(tiny_cfg):
    for family in FAMILIES:
        cfg = tiny_cfg(family=family)
        model = Transformer(cfg.model)
        boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))[
            "params"
        ]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim


def test_family_structure(tiny_cfg):
    _, gpt2 = _model_and_params(tiny_cfg())
    _, llama = _model_and_params(tiny_cfg(family="llama"))
    assert "pos_embed" in gpt2 and "lm_head" not in gpt2  # learned positions, tied output
    assert "pos_embed" not in llama and "lm_head" in llama  # rotary, untied output
    assert "gate" in llama["block_0"]["mlp"] and "gate" not in gpt2["block_0"]["mlp"]
    assert (
        "bias" in gpt2["block_0"]["attn"]["query"]
        and "bias" not in llama["block_0"]["attn"]["query"]
    )
    # Grouped-query attention: 4 query heads, 2 key/value heads of width 16.
    assert llama["block_0"]["attn"]["query"]["kernel"].shape == (64, 4, 16)
    assert llama["block_0"]["attn"]["key"]["kernel"].shape == (64, 2, 16)
    assert "bias" not in llama["final_norm"]  # RMSNorm has a scale only


def test_sinusoidal_encoding_matches_the_paper():
    d = 16
    pe = np.asarray(sinusoidal_encoding(jnp.arange(50)[None], d))[0]
    for p in (0, 3, 49):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert pe[p, 2 * i] == pytest.approx(np.sin(angle), abs=1e-5)
            assert pe[p, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    inv_freq = rope_frequencies(ModelConfig(d_model=8, n_heads=1, position="rope"))

    def score(pq, pk):
        rq = apply_rope(q, jnp.asarray([[pq]]), inv_freq)
        rk = apply_rope(k, jnp.asarray([[pk]]), inv_freq)
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-4)
    # Rotation preserves the norm.
    rotated = apply_rope(q, jnp.asarray([[7]]), inv_freq)
    assert float(jnp.linalg.norm(rotated)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
