"""Per-domain evaluation: a mixture's components are evaluated each on its own eval split."""

from __future__ import annotations

import json

import jax
import pytest
from conftest import CONFIGS

from flaxlm import config, domains, hooks
from flaxlm.data import pipeline
from flaxlm.evaluate import evaluate
from flaxlm.mesh import make_mesh
from flaxlm.metrics import MetricsWriter
from flaxlm.train import Trainer

PROSE = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 60
DIGITS = "".join(str(i * 7919 % 10) for i in range(5000))


def _write(tmp_path):
    for name, text in (("prose", PROSE), ("digits", DIGITS)):
        for split in ("train", "eval"):
            (tmp_path / f"{name}-{split}.txt").write_text(text)
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(
        "data:\n  corpus: mixture\n  mixture:\n"
        + "".join(
            f"    - {{corpus: files, train_files: '{tmp_path}/{n}-train.txt', "
            f"eval_files: '{tmp_path}/{n}-eval.txt', weight: 1.0{extra}}}\n"
            for n, extra in (("prose", ", name: prose"), ("digits", ""))
        )
    )
    return mixture


def test_each_component_of_a_mixture_gets_its_own_eval_metrics(tmp_path):
    mixture = _write(tmp_path)
    overrides = [f"train.run_dir={tmp_path / 'run'}", "train.progress_bar=false"]
    cfg = config.load_files([CONFIGS / "tiny.yaml", mixture], overrides)
    assert domains.names(cfg.data) == ["prose", "digits-train"]
    trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
    params = trainer.init_state(0).params
    writer = MetricsWriter(tmp_path, tensorboard=False)
    sets = domains.eval_sets(cfg.data)
    hook = hooks.Evaluate(trainer, pipeline.eval_batches(cfg.data), writer, 0, 1, domains=sets)
    whole = hook.run(params, 0)
    writer.close()
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["eval_loss"] == pytest.approx(whole["loss"])
    # The oracle: each source alone, configured as a plain (non-mixture) run.
    for name, text_file in (("prose", "prose"), ("digits-train", "digits")):
        alone = config.load(
            CONFIGS / "tiny.yaml",
            [
                *overrides,
                "data.corpus=files",
                f"data.train_files={tmp_path}/{text_file}-train.txt",
                f"data.eval_files={tmp_path}/{text_file}-eval.txt",
            ],
        )
        expected = evaluate(trainer, params, pipeline.eval_batches(alone.data))
        assert record[f"eval_loss/{name}"] == pytest.approx(expected["loss"], rel=1e-6)
        assert record[f"eval_bits_per_byte/{name}"] == pytest.approx(
            expected["bits_per_byte"], rel=1e-6
        )
    assert record["eval_loss/prose"] != record["eval_loss/digits-train"]


def test_mixture_names_must_differ(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "data:\n  corpus: mixture\n  mixture:\n"
        "    - {corpus: python-docs, name: a}\n    - {corpus: python-docs, name: a}\n"
    )
    with pytest.raises(config.ConfigError, match="repeat"):
        config.load_files([CONFIGS / "tiny.yaml", bad])
