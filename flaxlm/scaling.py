"""Scaling laws: train a ladder of models at several compute budgets, fit loss against compute.

    flaxlm scaling --config configs/scaling/tiny-ladder.yaml --out runs/scaling [key=value ...]

A ladder file (`LadderConfig`) names an experiment config, the models (each a list of overrides
of it) and the compute budgets in training FLOPs. Every (model, budget) pair trains a fresh model
for steps = budget / (FLOPs per token x tokens per step) on the experiment's dataset, with its
learning-rate schedule stretched over those steps, then measures the loss on the held-out split
(with `shared_runs: true`, one constant-rate run per model is evaluated at each budget instead:
cheaper, see `LadderConfig`).
Pairs that would train fewer than `min_steps` or more than `max_steps` steps are skipped (too
small a model for the budget, or too big).

For each budget the lowest loss over the models is the compute-efficient frontier, which is fit
with a power law with an irreducible term, L(C) = E + A C^-alpha (scipy's `curve_fit`, C in
FLOPs as counted by `flaxlm.flops`: 6N + 12 L T d per token). The plot shows every run, the
frontier, the fit and its residuals. Outputs: runs.csv, runs.json, fit.json, scaling.png.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flaxlm import config as config_lib
from flaxlm import report
from flaxlm.config import Config, ConfigError, Decay
from flaxlm.config.loading import read_yaml_tree
from flaxlm.data import pipeline
from flaxlm.evaluate import evaluate
from flaxlm.flops import analytic_param_count, flops_per_step
from flaxlm.loop import training_steps
from flaxlm.mesh import make_mesh
from flaxlm.run_state import NonFiniteLossError
from flaxlm.train import Trainer


@dataclasses.dataclass
class Rung:
    name: str
    # Overrides of the experiment config (model.d_model=..., model.n_layers=..., ...).
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LadderConfig:
    # The experiment config every run starts from; relative paths are relative to the ladder file.
    config: str
    models: list[Rung]
    # Training FLOPs of each run (6N + attention per token, times tokens trained).
    budgets: list[float]
    # Overrides applied to every run (before the model's own); the command line adds more.
    overrides: list[str] = dataclasses.field(default_factory=list)
    min_steps: int = 20
    max_steps: int = 100_000
    # False: one run per (model, budget), its learning-rate schedule spanning exactly that budget
    # (Chinchilla's approach 1). True: one run per model at a constant learning rate after
    # warm-up, evaluated when it has spent each budget (Kaplan-style learning curves): one
    # compilation and the largest budget's compute per model, which is what keeps a CPU ladder
    # within minutes; without a cool-down its losses sit a little above the separate runs'.
    shared_runs: bool = False


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    model: str
    budget: float
    steps: int
    cfg: Config


def load_ladder(path: str | Path) -> tuple[LadderConfig, Path]:
    """The ladder file, type-checked, and the path of its experiment config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ladder file not found: {path}")
    # `defaults: [other-ladder.yaml]` composes ladders as config files compose.
    nodes = read_yaml_tree(path, relative_keys=("config",))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(LadderConfig), *nodes)
        ladder = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f"ladder key {key!r}" if key else "ladder"
        raise ConfigError(f"{where} (from {path}): {str(e).splitlines()[0]}") from None
    assert isinstance(ladder, LadderConfig)
    if not ladder.models or not ladder.budgets:
        raise ConfigError(f"{path}: a ladder needs at least one entry in models and in budgets")
    if any(b <= 0 for b in ladder.budgets):
        raise ConfigError(f"{path}: budgets must be positive FLOP counts, got {ladder.budgets}")
    names = [m.name for m in ladder.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: model names must be unique, got {names}")
    return ladder, (path.parent / ladder.config)


def plan(
    ladder: LadderConfig, config_path: Path, overrides: Sequence[str] = ()
) -> tuple[list[PlannedRun], list[str]]:
    """The runs of the ladder (model-major order) and a note for each skipped pair.

    With `shared_runs`, the runs of one model share one config (trained once, evaluated at each
    run's step count); otherwise each has its own, with its schedule spanning its steps.
    """
    runs, skipped = [], []
    for rung in ladder.models:
        cfg = config_lib.load(config_path, [*ladder.overrides, *rung.overrides, *overrides])
        per_step = flops_per_step(cfg)
        steps_of = {}
        for budget in sorted(ladder.budgets):
            steps = round(budget / per_step)
            if ladder.min_steps <= steps <= ladder.max_steps:
                steps_of[budget] = steps
            else:
                skipped.append(
                    f"{rung.name} at {budget:.3g} FLOPs: {steps} steps, outside "
                    f"[{ladder.min_steps}, {ladder.max_steps}]"
                )
        if not steps_of:
            continue
        if ladder.shared_runs:
            # One constant-rate run as long as the largest budget; warm-up ends before the first
            # evaluation.
            warmup = min(cfg.optimizer.warmup_steps, min(steps_of.values()) // 10)
            shared = config_lib.replace(
                cfg,
                train={"steps": max(steps_of.values())},
                optimizer={"warmup_steps": warmup, "decay": Decay.constant},
            )
        for budget, steps in steps_of.items():
            if ladder.shared_runs:
                run_cfg = shared
            else:
                # The schedule spans the run (each budget its own run, as in Chinchilla's fits);
                # warm-up never takes more than a tenth of it.
                warmup = min(cfg.optimizer.warmup_steps, steps // 10)
                run_cfg = config_lib.replace(
                    cfg, train={"steps": steps}, optimizer={"warmup_steps": warmup}
                )
            runs.append(PlannedRun(rung.name, budget, steps, run_cfg))
    return runs, skipped


def train_and_evaluate(cfg: Config, eval_steps: Sequence[int]) -> Iterator[dict[str, Any]]:
    """Trains cfg from scratch (no checkpoints); at each of eval_steps, evaluates and yields."""
    start = time.perf_counter()
    trainer = Trainer(cfg, make_mesh(cfg))
    pid, count = jax.process_index(), jax.process_count()
    # No checkpoints here, so a plain iterator of numpy batches (no saved position) will do.
    data = pipeline.train_dataset(cfg.data, cfg.train.seed, pid, count).as_numpy_iterator()
    eval_set = pipeline.eval_batches(cfg.data, pid, count)
    state = trainer.init_state(cfg.train.seed)
    targets = sorted(eval_steps)
    # A target met twice (or step 0) has no step of its own: its train loss is NaN.
    done = 0
    while done < len(targets) and targets[done] == 0:
        yield _evaluation_record(trainer, state, None, 0, eval_set, start)
        done += 1
    last = targets[-1] if targets else 0
    for result in training_steps(trainer, state, data, range(1, last + 1)):
        metrics = result.metrics
        while done < len(targets) and targets[done] == result.step:
            yield _evaluation_record(trainer, result.state, metrics, result.step, eval_set, start)
            metrics = None
            done += 1


def _evaluation_record(
    trainer: Trainer, state, metrics: dict | None, step: int, eval_set, start: float
) -> dict[str, Any]:
    """The train loss of the step just taken (NaN if none) and the held-out evaluation."""
    train_loss = float(metrics["loss"]) if metrics is not None else math.nan
    if metrics is not None and not math.isfinite(train_loss):
        raise NonFiniteLossError(
            f"training diverged at step {step} (loss {train_loss}); lower "
            "optimizer.learning_rate in the ladder's overrides"
        )
    result = evaluate(trainer, state.params, eval_set)
    return {
        "train_loss": train_loss,
        "eval_loss": result["loss"],
        "eval_bits_per_byte": result["bits_per_byte"],
        "seconds": time.perf_counter() - start,
    }


def run_ladder(runs: Sequence[PlannedRun]) -> Iterator[dict[str, Any]]:
    """Trains the planned runs (one training per distinct config; progress on stderr) and yields
    one record per run."""
    progress = report.progress(total=len(runs), desc="scaling ladder", unit="run")
    groups: list[list[PlannedRun]] = []
    for run in runs:  # consecutive runs with one config (shared_runs) train once
        if groups and groups[-1][0].cfg is run.cfg:
            groups[-1].append(run)
        else:
            groups.append([run])
    for group in groups:
        cfg = group[0].cfg
        progress.set_postfix_str(
            f"{group[0].model}, {cfg.train.steps} steps to {group[-1].budget:.2g} FLOPs"
        )
        results = train_and_evaluate(cfg, [r.steps for r in group])
        for run, result in zip(group, results, strict=True):
            tokens = run.steps * cfg.data.global_batch_size * cfg.data.seq_len
            record = {
                "model": run.model,
                "params": analytic_param_count(cfg.model),
                "budget": run.budget,
                "steps": run.steps,
                "tokens": tokens,
                "compute": run.steps * flops_per_step(cfg),
                **result,
            }
            report.note(
                progress,
                f"{run.model} @ {run.budget:.2g}: eval loss {record['eval_loss']:.4f} "
                f"after {record['seconds']:.0f} s",
            )
            progress.update(1)
            yield record
    progress.close()


def frontier(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each budget, the run with the lowest eval loss (the compute-efficient frontier)."""
    best: dict[float, dict[str, Any]] = {}
    for r in records:
        if r["budget"] not in best or r["eval_loss"] < best[r["budget"]]["eval_loss"]:
            best[r["budget"]] = r
    return [best[b] for b in sorted(best)]


def power_law(compute, E: float, A: float, alpha: float):
    """L(C) = E + A C^-alpha."""
    return E + A * np.power(compute, -alpha)


def _initial_guess(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """The best (E, a, alpha) over a grid of alpha, solving for E and a exactly at each one.

    For a fixed alpha the model is linear in E and a, so each grid point is a least-squares
    solve; starting curve_fit there keeps it out of the flat alpha -> 0 valley that a blind
    start can slide into.
    """
    best = (np.inf, 0.0, float(y.max() - y.min()), 0.3)
    for alpha in np.linspace(0.01, 3.0, 300):
        basis = np.power(x, -alpha)
        design = np.stack([np.ones_like(basis), basis], axis=1)
        (E, a), *_ = np.linalg.lstsq(design, y, rcond=None)
        if not 0 <= E <= y.min():  # outside the bounds: fit a alone with E at the nearer bound
            E = float(np.clip(E, 0.0, y.min()))
            a = float(np.dot(basis, y - E) / np.dot(basis, basis))
        if a <= 0:
            continue
        sse = float(np.sum((y - E - a * basis) ** 2))
        if sse < best[0]:
            best = (sse, float(E), float(a), float(alpha))
    # Strictly inside the bounds, as curve_fit requires.
    E = min(max(best[1], 1e-9), float(y.min()) * (1 - 1e-9))
    return E, max(best[2], 1e-9), best[3]


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of L(C) = E + A C^-alpha with E >= 0; parameters and standard errors.

    Fitted as E + a (C / C0)^-alpha with C0 the smallest compute, which keeps the parameters of
    order one for the optimiser whatever the units; A = a C0^alpha.
    """
    from scipy.optimize import curve_fit

    c = np.asarray(compute, np.float64)
    y = np.asarray(loss, np.float64)
    if len(c) < 3:
        raise ConfigError(
            f"a power law with an irreducible term has 3 parameters; got {len(c)} frontier "
            "points: add budgets to the ladder"
        )
    c0 = float(c.min())
    x = c / c0
    lo = float(y.min())
    (E, a, alpha), cov = curve_fit(
        power_law,
        x,
        y,
        p0=_initial_guess(x, y),
        bounds=([0.0, 0.0, 0.0], [lo, np.inf, 5.0]),
        maxfev=20_000,
    )
    errors = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    residuals = y - power_law(x, E, a, alpha)
    return {
        "E": float(E),
        "A": float(a * c0**alpha),
        "alpha": float(alpha),
        # A degenerate fit (as many points as parameters) has no finite error: null, not Infinity.
        "E_stderr": _finite_or_none(errors[0]),
        "alpha_stderr": _finite_or_none(errors[2]),
        "compute_reference": c0,
        "A_at_reference": float(a),
        "rms_residual": float(np.sqrt(np.mean(residuals**2))),
        "points": len(c),
    }


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def plot(records: Sequence[dict[str, Any]], fit: dict[str, float], path: Path) -> None:
    """Loss against compute for every run, the frontier and the fit; residuals below."""
    ratios = {"height_ratios": [3, 1]}
    with report.figure(
        path, nrows=2, ncols=1, figsize=(6, 5.5), sharex=True, gridspec_kw=ratios
    ) as (top, bottom):
        for model in dict.fromkeys(r["model"] for r in records):
            rows = sorted((r for r in records if r["model"] == model), key=lambda r: r["compute"])
            params = rows[0]["params"]
            top.plot(
                [r["compute"] for r in rows], [r["eval_loss"] for r in rows], "o-", alpha=0.6,
                markersize=4, label=f"{model} ({params / 1e6:.2g}M)",
            )  # fmt: skip
        front = frontier(records)
        fc = np.array([r["compute"] for r in front])
        fl = np.array([r["eval_loss"] for r in front])
        top.scatter(fc, fl, s=80, facecolors="none", edgecolors="black", label="frontier", zorder=3)
        grid = np.geomspace(fc.min() / 1.5, fc.max() * 1.5, 100)
        fitted = power_law(grid, fit["E"], fit["A"], fit["alpha"])
        top.plot(
            grid, fitted, "k--",
            label=f"L = {fit['E']:.2f} + {fit['A']:.3g} C^-{fit['alpha']:.3f}",
        )  # fmt: skip
        top.set_xscale("log")
        top.set_ylabel("eval loss (nats / token)")
        top.set_title("Loss against training compute", fontsize=10)
        top.legend(fontsize=7)
        top.grid(True, which="both", alpha=0.3)
        bottom.axhline(0.0, color="gray", lw=1)
        bottom.plot(fc, fl - power_law(fc, fit["E"], fit["A"], fit["alpha"]), "ko")
        bottom.set_xlabel("training compute C (FLOPs)")
        bottom.set_ylabel("residual")
        bottom.grid(True, which="both", alpha=0.3)


def write_results(
    records: Sequence[dict[str, Any]], directory: Path
) -> tuple[dict[str, float], list[Path]]:
    """Fits the frontier and writes runs.csv, runs.json, fit.json and scaling.png."""
    front = frontier(records)
    fit = fit_power_law([r["compute"] for r in front], [r["eval_loss"] for r in front])
    fit["frontier"] = [{"model": r["model"], "budget": r["budget"]} for r in front]
    json_path, csv_path = report.write_table(records, directory, "runs")
    fit_path = report.write_json(fit, directory / "fit.json")
    png = directory / "scaling.png"
    plot(records, fit, png)
    return fit, [csv_path, json_path, fit_path, png]
