"""Hugging Face parity for the Llama-shaped families beyond Llama: Mistral (sliding window),
Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm).

As in test_convert: small random transformers models (nothing downloaded) are saved, imported,
compared on logits (float32, 1e-4), exported back bit for bit, and greedy generation equals
transformers' `generate` (for Mistral past the window, so the decode ring buffer wraps).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import _compare_logits, _save  # noqa: E402

from flaxlm import convert  # noqa: E402
from flaxlm.generate import generate  # noqa: E402
from flaxlm.run_dir import load_run  # noqa: E402

_COMMON = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)  # fmt: skip


def _mistral(path):
    cfg = transformers.MistralConfig(**_COMMON, sliding_window=8, head_dim=16)
    return _save(transformers.MistralForCausalLM(cfg), path / "hf-mistral")


def _qwen2(path):
    cfg = transformers.Qwen2Config(**_COMMON)
    return _save(transformers.Qwen2ForCausalLM(cfg), path / "hf-qwen2")


def _qwen3(path):
    cfg = transformers.Qwen3Config(**{**_COMMON, "tie_word_embeddings": True}, head_dim=32)
    return _save(transformers.Qwen3ForCausalLM(cfg), path / "hf-qwen3")


def _gemma2(path, final_cap=0.3):
    # Small caps so that soft-capping bends these small random logits; 3 layers: local, global,
    # local; query_pre_attn_scalar differs from head_dim. (Generation uses Gemma's own final cap
    # of 30: a cap this small squeezes the logits into near-ties that decide argmax by rounding.)
    cfg = transformers.Gemma2Config(
        **{**_COMMON, "num_hidden_layers": 3, "tie_word_embeddings": True}, head_dim=16,
        query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=0.5,
        final_logit_softcapping=final_cap,
    )  # fmt: skip
    return _save(transformers.Gemma2ForCausalLM(cfg), path / "hf-gemma2")


FAMILIES = {"mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers_and_export_round_trips(tmp_path, name):
    model, src = FAMILIES[name](tmp_path)
    convert.from_hf(src, tmp_path / "run")
    cfg = _compare_logits(model, tmp_path / "run")
    assert convert.family(cfg.model) == name
    assert (cfg.model.sliding_window, cfg.model.qkv_bias, cfg.model.qk_norm) == {
        "mistral": (8, False, False),
        "qwen2": (None, True, False),
        "qwen3": (None, False, True),
        "gemma2": (8, False, False),
    }[name]
    convert.to_hf(tmp_path / "run", tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert type(reloaded) is type(model)
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    reloaded_state = reloaded.state_dict()
    assert set(reloaded_state) == set(original)
    for key, value in reloaded_state.items():
        np.testing.assert_array_equal(value.numpy(), original[key], err_msg=key)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_greedy_generation_equals_transformers_generate(tmp_path, name):
    """Two prompts of different lengths decoded together (left-padded) give what transformers
    generates for each alone; Mistral's window of 8 is passed many times over."""
    model, src = FAMILIES[name](tmp_path, **({"final_cap": 30.0} if name == "gemma2" else {}))
    convert.from_hf(src, tmp_path / "run")
    _, trainer, params, _ = load_run(tmp_path / "run")
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, 300, 13)), list(rng.integers(1, 300, 5))]
    new = 24
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0
            )
        expected.append(out[0].tolist())
    got = generate(trainer.model, jax.device_get(params), prompts, new)
    assert got == expected
