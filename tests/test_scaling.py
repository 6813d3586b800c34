"""Scaling laws: the power-law fit, the frontier, the ladder plan and a small ladder end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import CONFIGS
from helpers import flaxlm

from flaxlm.config import ConfigError
from flaxlm.flops import flops_per_step
from flaxlm.scaling import (
    LadderConfig,
    Rung,
    fit_power_law,
    frontier,
    load_ladder,
    plan,
    power_law,
    write_results,
)

# The reducible term falls from 2.0 to 0.13 nats over the compute range, as in a real ladder.
TRUE = {"E": 1.5, "A": 2.0 * 1e10**0.3, "alpha": 0.3}


def _synthetic(noise: float, seed: int = 0):
    compute = np.geomspace(1e10, 1e14, 9)
    rng = np.random.default_rng(seed)
    clean = power_law(compute, TRUE["E"], TRUE["A"], TRUE["alpha"])
    return compute, clean * (1 + noise * rng.standard_normal(compute.shape))


def test_fit_recovers_exact_power_law():
    fit = fit_power_law(*_synthetic(noise=0.0))
    assert fit["E"] == pytest.approx(TRUE["E"], rel=1e-4)
    assert fit["A"] == pytest.approx(TRUE["A"], rel=1e-3)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-4)
    assert fit["rms_residual"] < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_noisy_power_law_within_its_error(seed):
    fit = fit_power_law(*_synthetic(noise=0.005, seed=seed))
    assert abs(fit["alpha"] - TRUE["alpha"]) < max(4 * fit["alpha_stderr"], 0.02)
    assert abs(fit["E"] - TRUE["E"]) < max(4 * fit["E_stderr"], 0.05)
    assert 0 < fit["rms_residual"] < 0.02


def test_fit_needs_three_points():
    with pytest.raises(ConfigError, match="3 parameters"):
        fit_power_law([1e10, 1e11], [3.0, 2.5])


def _record(model, budget, loss, params=1000):
    return {"model": model, "params": params, "budget": budget, "compute": budget * 1.01,
            "eval_loss": loss}  # fmt: skip


def test_frontier_takes_the_best_model_of_each_budget():
    records = [
        _record("small", 1e10, 3.0), _record("big", 1e10, 3.5),
        _record("small", 1e11, 2.6), _record("big", 1e11, 2.4),
        _record("big", 1e12, 2.0),
    ]  # fmt: skip
    assert [(r["model"], r["budget"]) for r in frontier(records)] == [
        ("small", 1e10),
        ("big", 1e11),
        ("big", 1e12),
    ]


def test_write_results_fits_the_frontier_and_plots(tmp_path):
    compute, loss = _synthetic(noise=0.0)
    records = [_record("m", c, y) for c, y in zip(compute, loss, strict=True)]
    records += [_record("worse", c, y + 0.3) for c, y in zip(compute, loss, strict=True)]
    fit, paths = write_results(records, tmp_path)
    assert {p.name for p in paths} == {"runs.csv", "runs.json", "fit.json", "scaling.png"}
    # The frontier is the "m" runs; their compute is budget x 1.01, which scales A by 1.01^alpha.
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-3)
    assert fit["A"] == pytest.approx(TRUE["A"] * 1.01 ** TRUE["alpha"], rel=1e-3)
    assert json.loads((tmp_path / "fit.json").read_text())["alpha"] == fit["alpha"]
    with (tmp_path / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(records)
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_plan_turns_budgets_into_steps():
    ladder = LadderConfig(
        config="tiny.yaml",
        models=[Rung("small", ["model.d_model=32", "model.n_heads=2"]), Rung("default", [])],
        budgets=[2e10, 1e10, 1e9],
        min_steps=10,
        max_steps=50,
    )
    runs, skipped = plan(ladder, CONFIGS / "tiny.yaml", ["optimizer.warmup_steps=100"])
    for run in runs:
        per_step = flops_per_step(run.cfg)
        # Each run spends its budget to within one step, its schedule spans it, warm-up <= 10%.
        assert abs(run.steps * per_step - run.budget) <= per_step / 2
        assert run.cfg.train.steps == run.steps
        assert run.cfg.optimizer.warmup_steps == run.steps // 10
        assert 10 <= run.steps <= 50
    assert len(runs) + len(skipped) == 6
    assert [(r.model, r.budget) for r in runs] == sorted(
        [(r.model, r.budget) for r in runs], key=lambda x: (x[0] != "small", x[1])
    )


def test_shared_runs_train_once_per_model_at_a_constant_rate():
    ladder = LadderConfig(
        config="tiny.yaml",
        models=[Rung("small", ["model.d_model=32", "model.n_heads=2"]), Rung("default", [])],
        budgets=[1e10, 3e10, 1e9],
        min_steps=10,
        shared_runs=True,
    )
    runs, _ = plan(ladder, CONFIGS / "tiny.yaml")
    for model in ("small", "default"):
        mine = [r for r in runs if r.model == model]
        assert len({id(r.cfg) for r in mine}) == 1  # one training run, evaluated at each budget
        cfg = mine[0].cfg
        assert cfg.train.steps == max(r.steps for r in mine)
        assert cfg.optimizer.decay == "constant"
        assert cfg.optimizer.warmup_steps <= min(r.steps for r in mine) // 10


def test_bad_ladder_files_fail_early(tmp_path):
    path = tmp_path / "ladder.yaml"
    path.write_text("config: tiny.yaml\nmodels: [{name: a}]\nbudgets: [1e10]\nmin_step: 3\n")
    with pytest.raises(ConfigError, match="min_step"):
        load_ladder(path)
    path.write_text("config: tiny.yaml\nmodels: [{name: a}, {name: a}]\nbudgets: [1.0e10]\n")
    with pytest.raises(ConfigError, match="unique"):
        load_ladder(path)
    with pytest.raises(ConfigError, match="not found"):
        load_ladder(tmp_path / "missing.yaml")


def test_a_ladder_composes_another_with_defaults(tmp_path):
    small = tmp_path / "elsewhere" / "small.yaml"
    small.parent.mkdir()
    small.write_text(f"defaults: [{CONFIGS / 'scaling' / 'tiny-ladder.yaml'}]\nbudgets: [1.0e10]\n")
    ladder, experiment = load_ladder(small)
    parent, parent_experiment = load_ladder(CONFIGS / "scaling" / "tiny-ladder.yaml")
    assert ladder.budgets == [1.0e10] and ladder.models == parent.models
    # `config:` stays relative to the file that wrote it, not to the one inheriting it.
    assert experiment.resolve() == parent_experiment.resolve() == (CONFIGS / "tiny.yaml")


def test_shipped_ladders_plan():
    for name in ("tiny-ladder", "pod-ladder"):
        ladder, experiment = load_ladder(CONFIGS / "scaling" / f"{name}.yaml")
        runs, _ = plan(ladder, experiment)
        assert len({r.budget for r in runs}) >= 3, name  # enough frontier points for the fit


@pytest.mark.slow
def test_small_ladder_end_to_end(tmp_path, corpus_cache):
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(
        f"config: {CONFIGS / 'tiny.yaml'}\n"
        f"overrides: [data.cache_dir={corpus_cache}, model.d_model=32, model.n_heads=2,"
        " model.d_ff=128, data.global_batch_size=4]\n"
        "models: [{name: d32}]\n"
        "budgets: [2.0e9, 6.0e9, 1.8e10]\n"
        "min_steps: 10\n"
        "shared_runs: true\n"
    )
    out = tmp_path / "out"
    proc = flaxlm("scaling", "--config", str(ladder), "--out", str(out), devices=1)
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    runs, fit = lines[:-1], lines[-1]["fit"]
    assert [r["budget"] for r in runs] == [2e9, 6e9, 1.8e10]
    # More compute, lower held-out loss (one run evaluated at 3x the steps each time).
    losses = [r["eval_loss"] for r in runs]
    assert losses[0] > losses[1] > losses[2]
    assert fit["points"] == 3 and fit["alpha"] > 0
    assert {p.name for p in out.iterdir()} == {"runs.csv", "runs.json", "fit.json", "scaling.png"}
