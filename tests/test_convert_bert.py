"""BERT parity: flaxlm's encoder is the same function as transformers' `BertForMaskedLM`.

A small random `BertConfig` model (nothing downloaded) is saved, imported with `flaxlm convert
from-hf`, and compared on masked-LM logits (float32, 1e-4) over a right-padded batch with token
types; exported with `to-hf`, it loads back into `BertForMaskedLM` with the same logits and the
same tensors, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import _save  # noqa: E402

from flaxlm import convert  # noqa: E402
from flaxlm.run_dir import load_run  # noqa: E402

VOCAB = 320  # room for the byte tokenizer's ids and its [MASK], which the imported run uses


def _bert(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    return _save(transformers.BertForMaskedLM(cfg), tmp_path / "hf-bert")


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (3, 40))
    types = (np.arange(40) >= 20).astype(np.int64) * np.ones((3, 1), np.int64)
    mask = np.ones((3, 40), np.int64)
    mask[1, 25:] = 0  # right padding: rows of different lengths
    mask[2, 10:] = 0
    return tokens, types, mask


def _compare(hf_model, run_dir):
    tokens, types, mask = _batch()
    with torch.no_grad():
        expected = hf_model(
            input_ids=torch.tensor(tokens),
            token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(mask),
        ).logits.numpy()
    cfg, trainer, params, _ = load_run(run_dir)
    positions = np.broadcast_to(np.arange(40), tokens.shape)
    got = np.asarray(trainer.model.apply({"params": params}, tokens, positions, mask, types))
    real = mask.astype(bool)  # padded positions are not compared (their outputs are unused)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)
    return cfg


def test_bert_logits_match_transformers_with_padding_and_token_types(tmp_path):
    model, src = _bert(tmp_path)
    convert.from_hf(src, tmp_path / "run")
    cfg = _compare(model, tmp_path / "run")
    assert convert.family(cfg.model) == "bert"
    assert cfg.model.arch == "encoder" and cfg.train.objective == "mlm"
    assert cfg.model.norm_eps == 1e-12 and cfg.model.mlp == "gelu_exact"
    assert cfg.model.dropout_attn == cfg.model.dropout_residual == 0.1


def test_bert_export_loads_in_transformers_and_round_trips_exactly(tmp_path):
    model, src = _bert(tmp_path)
    convert.from_hf(src, tmp_path / "run")
    convert.to_hf(tmp_path / "run", tmp_path / "exported")
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "exported").eval()
    _compare(reloaded, tmp_path / "run")
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[name], err_msg=name)
    # The decoder is tied to the word embeddings, its bias to cls.predictions.bias.
    assert reloaded.cls.predictions.decoder.weight.data_ptr() == (
        reloaded.bert.embeddings.word_embeddings.weight.data_ptr()
    )


def test_byte_level_bert_exports_its_mask_token(tmp_path):
    _, src = _bert(tmp_path)
    convert.from_hf(src, tmp_path / "run")
    convert.to_hf(tmp_path / "run", tmp_path / "exported")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == 259
    assert tok("a[MASK]b")["input_ids"] == [97, 259, 98]


def test_masked_lm_gradients_match_transformers(tmp_path):
    """The training objective too: gradients of the masked-token cross entropy (summed) equal
    those of torch's backward through `BertForMaskedLM` (both without dropout: eval mode)."""
    import jax

    from flaxlm.train import loss_sums

    model, src = _bert(tmp_path)
    convert.from_hf(src, tmp_path / "run")
    _, trainer, params, _ = load_run(tmp_path / "run")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, VOCAB, (2, 40)).astype(np.int32)
    chosen = rng.random(labels.shape) < 0.3
    tokens = np.where(chosen, 259, labels).astype(np.int32)
    batch = {
        "tokens": tokens,
        "positions": np.tile(np.arange(40, dtype=np.int32), (2, 1)),
        "segment_ids": np.ones_like(tokens),
        "labels": labels,
        "label_weights": chosen.astype(np.int32),
    }
    grads = jax.grad(lambda p: loss_sums(p, trainer.model, batch, 0.0)[0])(params)
    logits = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits
    mask = torch.tensor(chosen)
    targets = torch.tensor(labels, dtype=torch.long)[mask]
    torch.nn.functional.cross_entropy(logits[mask], targets, reduction="sum").backward()
    query = model.bert.encoder.layer[0].attention.self.query.weight.grad.numpy()
    got_query = np.asarray(grads["block_0"]["attn"]["query"]["kernel"]).reshape(32, 32).T
    np.testing.assert_allclose(got_query, query, atol=1e-7, rtol=1e-3)
    for got, want in [
        (grads["embed"]["embedding"], model.bert.embeddings.word_embeddings.weight.grad),
        (grads["pos_embed"]["embedding"], model.bert.embeddings.position_embeddings.weight.grad),
        (grads["mlm_bias"], model.cls.predictions.bias.grad),
    ]:
        np.testing.assert_allclose(
            np.asarray(got), want.numpy(), atol=1e-3 * float(want.abs().max())
        )
