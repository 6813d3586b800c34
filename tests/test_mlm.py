"""Masked-LM pretraining: the pipeline's masking (BERT's 15% and 80/10/10, seeded and
resumable), the loss and accuracy on masked positions only, evaluation and fill-mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CONFIGS
from helpers import flaxlm

from flaxlm import config
from flaxlm.config import BYTE_MASK_ID, ConfigError
from flaxlm.data import pipeline
from flaxlm.data.masking import mask_statistics
from flaxlm.data.tokenizer import ByteTokenizer
from flaxlm.mesh import make_mesh
from flaxlm.objective import forward_losses, loss_sums
from flaxlm.train import Trainer


@pytest.fixture
def bert_cfg(corpus_cache, tmp_path):
    def make(*overrides: str):
        return config.load_files(
            [str(CONFIGS / "tiny.yaml"), str(CONFIGS / "models" / "bert-tiny.yaml")],
            [
                f"data.cache_dir={corpus_cache}",
                f"train.run_dir={tmp_path / 'run'}",
                "train.progress_bar=false",
                "train.tensorboard=false",
                *overrides,
            ],
        )

    return make


def _iterator(cfg, seed=0):
    return pipeline.train_iterator(cfg.data, seed, objective=cfg.train.objective)


def test_masking_statistics_follow_bert(bert_cfg):
    cfg = bert_cfg("data.global_batch_size=32")
    it = _iterator(cfg)
    batches = [next(it) for _ in range(12)]  # 12 x 32 x 64 = 24,576 tokens
    it.close()
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    stats = mask_statistics(merged, BYTE_MASK_ID)
    assert stats["chosen"] == pytest.approx(0.15, abs=0.01)
    assert stats["masked"] == pytest.approx(0.8, abs=0.03)
    assert stats["replaced"] == pytest.approx(0.1, abs=0.025)
    assert stats["kept"] == pytest.approx(0.1, abs=0.025)
    chosen = merged["label_weights"].astype(bool)
    # Unchosen tokens are untouched; specials (BOS, EOS) are never chosen; labels are the text.
    np.testing.assert_array_equal(merged["tokens"][~chosen], merged["labels"][~chosen])
    tok = ByteTokenizer()
    assert not np.isin(merged["labels"][chosen], [tok.bos_id, tok.eos_id, tok.pad_id]).any()
    assert (merged["labels"] == tok.bos_id).any()  # there were BOS tokens to leave alone
    assert (merged["labels"] < BYTE_MASK_ID).all()
    replaced = merged["tokens"][chosen & (merged["tokens"] != BYTE_MASK_ID)]
    assert (replaced < 256).all()  # random replacements are bytes


def test_masks_are_deterministic_and_resume_from_a_saved_position(bert_cfg, tmp_path):
    cfg = bert_cfg()
    a, b = _iterator(cfg), _iterator(cfg)
    for _ in range(3):
        x, y = next(a), next(b)
        for key in ("tokens", "labels", "label_weights"):
            np.testing.assert_array_equal(x[key], y[key])
    a.save(tmp_path / "position")
    expected = [next(a) for _ in range(3)]
    resumed = _iterator(cfg)
    resumed.restore(tmp_path / "position")
    for want in expected:
        got = next(resumed)
        for key in ("tokens", "labels", "label_weights"):
            np.testing.assert_array_equal(got[key], want[key])
    other = next(_iterator(cfg, seed=1))
    assert not np.array_equal(other["label_weights"], expected[0]["label_weights"])
    for it in (a, b, resumed):
        it.close()


def test_eval_masks_are_fixed(bert_cfg):
    cfg = bert_cfg()
    first = pipeline.eval_batches(cfg.data, objective=cfg.train.objective)
    second = pipeline.eval_batches(cfg.data, objective=cfg.train.objective)
    assert first[0]["label_weights"].sum() > 0
    np.testing.assert_array_equal(first[0]["tokens"], second[0]["tokens"])
    assert "bytes" in first[0]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_and_accuracy_count_masked_positions_only(bert_cfg):
    cfg = bert_cfg()
    trainer = Trainer(cfg, make_mesh(cfg))
    state = trainer.init_state(0)
    it = _iterator(cfg)
    local = next(it)
    it.close()
    batch = trainer.global_batch(local)
    with trainer.context():
        logits, _, _, _ = forward_losses(state.params, trainer.model, batch)
        _, aux = loss_sums(state.params, trainer.model, batch, z_loss=0.0)
    logits = np.asarray(logits)
    chosen = local["label_weights"].astype(bool)
    logp = _log_softmax(logits)
    picked = np.take_along_axis(logp, local["labels"][..., None], -1)[..., 0]
    np.testing.assert_allclose(float(aux["nats"]), -picked[chosen].sum(), rtol=1e-5)
    assert float(aux["tokens"]) == chosen.sum()
    hits = (logits.argmax(-1) == local["labels"]) & chosen
    assert float(aux["correct"]) == hits.sum()
    # Labels at unchosen positions do not matter: scrambling them changes nothing.
    scrambled = dict(local, labels=np.where(chosen, local["labels"], 7).astype(np.int32))
    with trainer.context():
        _, aux2 = loss_sums(state.params, trainer.model, trainer.global_batch(scrambled), 0.0)
    assert float(aux2["nats"]) == pytest.approx(float(aux["nats"]), rel=1e-6)


def test_encoder_attention_is_bidirectional_within_segments(bert_cfg):
    cfg = bert_cfg()
    trainer = Trainer(cfg, make_mesh(cfg))
    params = trainer.init_state(0).params
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    positions = np.concatenate([np.arange(8), np.arange(8)])[None]
    segments = np.repeat([1, 2], 8)[None]

    def run(t):
        return np.asarray(trainer.model.apply({"params": params}, t, positions, segments))

    base, later = run(tokens), run(tokens.copy())
    later_changed = tokens.copy()
    later_changed[0, 6] = 100  # a later token of segment 1
    changed = run(later_changed)
    assert np.abs(changed[0, :6] - base[0, :6]).max() > 1e-4  # earlier tokens see it
    np.testing.assert_array_equal(changed[0, 8:], later[0, 8:])  # segment 2 does not


def test_objective_and_architecture_must_agree(bert_cfg):
    with pytest.raises(ConfigError, match=r"train\.objective=clm does not fit model\.arch=encoder"):
        bert_cfg("train.objective=clm")
    with pytest.raises(ConfigError, match="no room for the byte tokenizer's \\[MASK\\]"):
        bert_cfg("model.vocab_size=259")
    with pytest.raises(ConfigError, match=r"model\.scan_layers=True is not supported"):
        bert_cfg("model.scan_layers=true")
    with pytest.raises(ConfigError, match=r"data\.mask_rate=0\.0 must be in"):
        bert_cfg("data.mask_rate=0")


@pytest.mark.slow
def test_train_eval_fill_mask_and_generate_refusal(bert_cfg, corpus_cache, tmp_path):
    run = tmp_path / "bert"
    flaxlm(
        "train", "--config", str(CONFIGS / "tiny.yaml"), "--config",
        str(CONFIGS / "models" / "bert-tiny.yaml"), f"train.run_dir={run}",
        f"data.cache_dir={corpus_cache}", "train.progress_bar=false", "train.steps=10",
        devices=1,
    )  # fmt: skip
    result = json.loads(flaxlm("eval", "--checkpoint", str(run), devices=1).stdout)
    for key in ("step", "loss", "tokens", "perplexity", "bits_per_byte"):
        assert key in result
    assert result["mlm_loss"] == result["loss"] and 0 <= result["mlm_accuracy"] <= 1
    out = flaxlm(
        "fill-mask", "--checkpoint", str(run), "--text", "a [MASK] b [MASK]", "--top-k", "3",
        devices=1,
    ).stdout  # fmt: skip
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["position"] for line in lines] == [3, 7]  # after BOS: "a " is two bytes
    for line in lines:
        probs = [p["probability"] for p in line["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and probs[0] <= 1
    refused = flaxlm("generate", "--checkpoint", str(run), "--prompt", "x", check=False)
    assert refused.returncode == 2 and "fill-mask" in refused.stderr
    none = flaxlm("fill-mask", "--checkpoint", str(run), "--text", "no mask", check=False)
    assert none.returncode == 2 and "[MASK]" in none.stderr


@pytest.mark.slow
def test_bert_quickstart_masked_accuracy_rises(corpus_cache, tmp_path):
    """A short run of configs/bert-quickstart.yaml: masked-token accuracy on the fixed eval
    masks goes from chance (1/320 for a uniform guess) to many times it."""
    run = tmp_path / "bert-quickstart"
    flaxlm(
        "train", "--config", str(CONFIGS / "bert-quickstart.yaml"), f"train.run_dir={run}",
        f"data.cache_dir={corpus_cache}", "train.progress_bar=false", "train.steps=60",
        "train.eval_every=60", "optimizer.warmup_steps=10", "checkpoint.every_steps=60",
        devices=1,
    )  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval_mlm_accuracy" in r}
    start, end = evals[0]["eval_mlm_accuracy"], evals[60]["eval_mlm_accuracy"]
    assert start < 0.02 and end > 0.12 and end > 10 * max(start, 1 / 320)
    assert evals[60]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"] - 1.0


@pytest.mark.slow
def test_mlm_resume_continues_exactly_on_eight_devices(corpus_cache, tmp_path):
    """Killed after step 3 and resumed: the same masks and dropout, so the same losses and
    accuracies, bit for bit (8 CPU devices, parameters sharded over fsdp)."""
    import shutil

    def train(run):
        return flaxlm(
            "train", "--config", str(CONFIGS / "tiny.yaml"), "--config",
            str(CONFIGS / "models" / "bert-tiny.yaml"), f"train.run_dir={run}",
            f"data.cache_dir={corpus_cache}", "train.progress_bar=false", "train.steps=6",
            "train.log_every=1", "checkpoint.every_steps=3", "checkpoint.async_save=false",
            "model.dropout_embed=0.1", "model.dropout_attn=0.1", "model.dropout_residual=0.1",
        )  # fmt: skip

    def records(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if "mlm_accuracy" in r}

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(full)
    resumed.mkdir()
    shutil.copy(full / "config.yaml", resumed / "config.yaml")
    shutil.copytree(full / "checkpoints" / "3", resumed / "checkpoints" / "3")
    assert "at step 3" in train(resumed).stderr
    want, got = records(full), records(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert (got[step]["loss"], got[step]["mlm_accuracy"]) == (
            want[step]["loss"],
            want[step]["mlm_accuracy"],
        )
