"""Hugging Face parity: flaxlm is the same function as transformers' GPT-2 and Llama.

Reference models are built from small local configs with random weights (nothing downloaded),
saved with `save_pretrained`, imported with `flaxlm convert from-hf`, and compared on a padded
batch. Exported checkpoints load back into transformers and round-trip exactly.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flaxlm import convert  # noqa: E402
from flaxlm.config import ConfigError  # noqa: E402
from flaxlm.run_dir import load_run  # noqa: E402


def _gpt2(tmp_path):
    cfg = transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return _save(transformers.GPT2LMHeadModel(cfg), tmp_path / "hf-gpt2")


# Rope scalings, each stretching a context of 16 positions (the test rows have 40).
ROPES = {
    "none": {"rope_type": "default"},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    # DeepSeek's YaRN: other ramp bounds and the attention factor as a ratio of temperatures.
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
                    "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.7},
}  # fmt: skip


def _llama(tmp_path, scaling=True, tie=False):
    kind = scaling if isinstance(scaling, str) else ("llama3" if scaling else "none")
    rope = {**ROPES[kind], "rope_theta": 10000.0}
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters=rope, tie_word_embeddings=tie, rms_norm_eps=1e-5,
    )  # fmt: skip
    return _save(transformers.LlamaForCausalLM(cfg), tmp_path / "hf-llama")


def _save(model, path):
    torch.manual_seed(0)
    with torch.no_grad():  # random, non-trivial weights everywhere (norms and biases too)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and "norm" in str(p) else 0.0))
    model.eval()
    model.save_pretrained(path)
    return model, path


def _padded_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (3, 40))
    mask = np.ones((3, 40), np.int64)
    mask[1, 25:] = 0  # right padding: rows of different lengths
    mask[2, 10:] = 0
    return tokens, mask


def _compare_logits(hf_model, run_dir, atol=1e-4):
    tokens, mask = _padded_batch()
    with torch.no_grad():
        expected = hf_model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    cfg, trainer, params, _ = load_run(run_dir)
    positions = np.broadcast_to(np.arange(40), tokens.shape)
    got = np.asarray(trainer.model.apply({"params": params}, tokens, positions, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=atol, rtol=1e-4)
    return cfg


@pytest.mark.parametrize("scan", [False, True])
def test_gpt2_logits_match_transformers(tmp_path, scan):
    model, src = _gpt2(tmp_path)
    convert.from_hf(src, tmp_path / "run", [f"model.scan_layers={scan}"])
    cfg = _compare_logits(model, tmp_path / "run")
    assert convert.family(cfg.model) == "gpt2"


@pytest.mark.parametrize("scaling", list(ROPES))
def test_llama_gqa_rope_scaling_logits_match_transformers(tmp_path, scaling):
    model, src = _llama(tmp_path, scaling=scaling)
    convert.from_hf(src, tmp_path / "run")
    cfg = _compare_logits(model, tmp_path / "run")
    assert cfg.model.kv_heads == 2 and cfg.model.rope_scaling == scaling.split("-")[0]
    # Exported, the scaling reads back into transformers as the same model.
    convert.to_hf(tmp_path / "run", tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    _compare_logits(reloaded, tmp_path / "run")


@pytest.mark.parametrize("make", [_gpt2, lambda p: _llama(p, tie=True)])
def test_export_loads_in_transformers_and_round_trips_exactly(tmp_path, make):
    from safetensors.numpy import load_file

    model, src = make(tmp_path)
    convert.from_hf(src, tmp_path / "run")
    convert.to_hf(tmp_path / "run", tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[name], err_msg=name)
    # ... and flaxlm -> HF -> flaxlm gives the same parameters, bit for bit.
    convert.from_hf(tmp_path / "exported", tmp_path / "run2")
    _, _, first, _ = load_run(tmp_path / "run")
    _, _, second, _ = load_run(tmp_path / "run2")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), jax.device_get(second))
    assert set(load_file(tmp_path / "exported" / "model.safetensors")) <= set(original)


def test_mismatched_checkpoint_names_the_parameter(tmp_path):
    _, src = _gpt2(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["n_inner"] = 64  # the weights have 128
    (src / "config.json").write_text(json.dumps(config))
    expected = (
        r"tensor 'h.0.mlp.c_fc.weight' has shape \(32, 128\) but config.json implies \(32, 64\)"
    )
    with pytest.raises(ConfigError, match=expected):
        convert.from_hf(src, tmp_path / "run")


def test_imported_model_continues_training(tmp_path, corpus_cache):
    from flaxlm import config, loop

    _, src = _llama(tmp_path)
    convert.from_hf(src, tmp_path / "run")
    cfg = config.load(
        tmp_path / "run" / "config.yaml",
        [f"data.cache_dir={corpus_cache}", "data.seq_len=32", "train.steps=2",
         "train.progress_bar=false", "train.sample_prompt=", "train.tensorboard=false"],
    )  # fmt: skip
    summary = loop.run(cfg)
    assert summary.start_step == 0 and summary.end_step == 2


def _bpe_tokenizer(corpus_cache, vocab_size=300):
    """A byte-level BPE tokenizer (GPT-2's kind) trained here on the local corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from flaxlm.data.corpus import build_python_docs

    texts = [
        p.read_text() for p in sorted((build_python_docs(corpus_cache) / "train").glob("*.txt"))
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )  # fmt: skip
    tok.train_from_iterator(texts[:100], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_gpt2_generate_prints_what_transformers_generates(tmp_path, corpus_cache):
    """The classic example, with a small random GPT-2 and a locally trained BPE tokenizer."""
    from helpers import flaxlm

    model, src = _gpt2(tmp_path)
    hf_tok = _bpe_tokenizer(corpus_cache)
    hf_tok.save_pretrained(src)
    ids = hf_tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=50, do_sample=False, pad_token_id=0)
    expected = hf_tok.decode(out[0])
    assert out.shape[1] == ids.shape[1] + 50  # the reference did not stop early

    flaxlm("convert", "from-hf", str(src), str(tmp_path / "run"), devices=1)
    got = flaxlm(
        "generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "Once upon a time",
        "--max-new-tokens", "50", devices=1,
    ).stdout  # fmt: skip
    assert got == expected + "\n"

    # The imported run trains and evaluates on its own tokenizer's ids (data.tokenizer=hf): a
    # random model scores about ln(300) nats per token, and bits per byte divide by the bytes of
    # text, more than one per BPE token (counting tokens as bytes would give loss / ln 2).
    # (This random model's generation config names BOS/EOS 50256, outside its 300 ids.)
    refused = flaxlm("eval", "--checkpoint", str(tmp_path / "run"), check=False, devices=1)
    assert refused.returncode == 2 and "bos_id=50256 is outside" in refused.stderr
    ev = flaxlm(
        "eval", "--checkpoint", str(tmp_path / "run"), f"data.cache_dir={corpus_cache}",
        "data.seq_len=32", "data.eval_batches=1", "data.add_bos=false", "data.add_eos=false",
        devices=1,
    ).stdout  # fmt: skip
    result = json.loads(ev)
    assert abs(result["loss"] - np.log(300)) < 0.5
    assert result["bits_per_byte"] < 0.8 * result["loss"] / np.log(2)
