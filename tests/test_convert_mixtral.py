"""Hugging Face parity for Mixtral: flaxlm's mixture-of-experts model is the same function as
transformers' MixtralForCausalLM (random small config, nothing downloaded), and exports load
back into transformers exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flaxlm import convert  # noqa: E402
from flaxlm.config import ConfigError  # noqa: E402
from flaxlm.run_dir import load_run  # noqa: E402


def _mixtral(path):
    cfg = transformers.MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # random, non-trivial weights everywhere, norms near 1
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("scan", [False, True])
def test_mixtral_logits_match_transformers(tmp_path, scan):
    model = _mixtral(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "run", [f"model.scan_layers={scan}"])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (3, 40))
    mask = np.ones((3, 40), np.int64)
    mask[1, 25:] = 0  # right padding: rows of different lengths
    with torch.no_grad():
        expected = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    cfg, trainer, params, _ = load_run(tmp_path / "run")
    assert convert.family(cfg.model) == "mixtral" and cfg.model.moe.num_experts == 4
    positions = np.broadcast_to(np.arange(40), tokens.shape)
    got = np.asarray(trainer.model.apply({"params": params}, tokens, positions, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_mixtral_export_loads_in_transformers_and_round_trips(tmp_path):
    model = _mixtral(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "run")
    convert.to_hf(tmp_path / "run", tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    original = model.state_dict()
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[name].numpy(), err_msg=name)
    convert.from_hf(tmp_path / "exported", tmp_path / "run2")
    _, _, first, _ = load_run(tmp_path / "run")
    _, _, second, _ = load_run(tmp_path / "run2")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), jax.device_get(second))


def test_mixtures_without_a_hugging_face_equivalent_are_refused(tiny_cfg):
    cfg = tiny_cfg("model.moe.num_experts=4", "model.moe.num_shared_experts=1", family="llama")
    with pytest.raises(ConfigError, match="no Hugging Face equivalent"):
        convert.hf_config(cfg.model)
