"""Evaluating parameters: mean loss, perplexity and bits per byte, during training and after.

Bits per byte (total nats / ln 2 / bytes of text predicted) does not depend on the tokenizer,
so runs with different vocabularies compare on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxlm import fs
from flaxlm.data import pipeline
from flaxlm.metrics import log
from flaxlm.run_dir import check_tokenizer, load_run, open_run
from flaxlm.run_params import check_model
from flaxlm.train import Trainer


def evaluate(
    trainer: Trainer, params, batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte over an iterable of process-local batches.

    For an encoder every figure is over the masked tokens alone (`tokens` counts them, bits per
    byte divides by their bytes), and `mlm_loss` (the same as `loss`) and `mlm_accuracy` (the
    share of masked tokens whose label is the most likely token) are added.
    """
    totals: dict[str, float] = {}
    for local in batches:
        sums = jax.device_get(trainer.eval_step(params, trainer.global_batch(local)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    nats, tokens = totals.get("nats", 0.0), totals.get("tokens", 0.0)
    loss = nats / max(tokens, 1.0)
    result = {
        "loss": loss,
        "perplexity": float(np.exp(min(loss, 700.0))),
        "bits_per_byte": nats / np.log(2.0) / max(totals.get("bytes", 0.0), 1.0),
        "tokens": int(tokens),
    }
    if "correct" in totals:
        result["mlm_loss"] = loss
        result["mlm_accuracy"] = totals["correct"] / max(tokens, 1.0)
    return result


def evaluate_all_steps(
    run_dir: str | Path, overrides: Sequence[str] = ()
) -> Iterator[dict[str, Any]]:
    """Evaluates every checkpoint of a run, yielding each result as it comes; then writes
    `eval/table.csv` and `eval/eval_loss.png` and says where."""
    cfg, trainer, checkpointer = open_run(run_dir, overrides)
    try:
        check_tokenizer(run_dir, cfg)
        batches = pipeline.eval_batches(
            cfg.data, jax.process_index(), jax.process_count(), cfg.train.objective
        )
        results = []
        for step in checkpointer.all_steps():
            check_model(checkpointer, step, cfg, run_dir)
            params = checkpointer.restore_params(step, trainer.abstract_state.params)
            results.append({"step": step, **evaluate(trainer, params, batches)})
            yield results[-1]
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        target = fs.as_path(run_dir) / "eval"
        with fs.staged(target) as local:
            _write_table_and_plot(local, results, target.parent.name)
        log(f"wrote {target / 'table.csv'} and {target / 'eval_loss.png'}")


def _write_table_and_plot(directory: Path, results: list[dict[str, Any]], run_name: str) -> None:
    from flaxlm import report

    report.write_csv(results, directory / "table.csv")
    with report.figure(directory / "eval_loss.png", dpi=100, figsize=(6, 4)) as ax:
        ax.plot([r["step"] for r in results], [r["loss"] for r in results], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss (nats per token)")
        ax.set_title(f"eval loss of {run_name}")
        ax.grid(alpha=0.3)


def evaluate_run(
    run_dir: str | Path, step: int | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Evaluates a checkpoint of a run on its configured eval split."""
    cfg, trainer, params, step = load_run(run_dir, step, overrides)
    check_tokenizer(run_dir, cfg)
    batches = pipeline.eval_batches(
        cfg.data, jax.process_index(), jax.process_count(), cfg.train.objective
    )
    return {"step": step, **evaluate(trainer, params, batches)}
