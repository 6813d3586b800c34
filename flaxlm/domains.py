"""Per-domain evaluation: each component of a data mixture evaluated on its own eval split.

A run on `data.corpus: mixture` evaluates, besides the whole mixture, every component by
itself, and logs `eval_loss/<name>` and `eval_bits_per_byte/<name>` next to `eval_loss` (in
TensorBoard as `eval/loss/<name>`), so that a mixture's effect on each domain shows.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from flaxlm.config import Corpus, DataConfig, Objective
from flaxlm.config.schema import SourceConfig, SourceFields
from flaxlm.data import pipeline


def _default_name(m: SourceConfig, index: int) -> str:
    if m.corpus == Corpus.tfds and m.tfds_name:
        base = m.tfds_name
    elif m.corpus == Corpus.files and m.train_files:
        base = Path(m.train_files.split(",")[0]).stem.strip("*") or f"files{index}"
    else:
        base = m.corpus.value
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base)


def names(cfg: DataConfig) -> list[str]:
    """The domain names of cfg's mixture components, unique (an index is added to repeats)."""
    chosen = [m.name or _default_name(m, i) for i, m in enumerate(cfg.mixture)]
    return [n if chosen.count(n) == 1 else f"{n}{i}" for i, n in enumerate(chosen)]


def component_config(cfg: DataConfig, component: SourceConfig) -> DataConfig:
    """cfg reading only this component."""
    fields = {f.name: getattr(component, f.name) for f in dataclasses.fields(SourceFields)}
    return dataclasses.replace(cfg, mixture=[], **fields)


def eval_sets(
    cfg: DataConfig,
    process_index: int = 0,
    process_count: int = 1,
    objective: Objective = Objective.clm,
) -> dict[str, list[pipeline.HostBatch]]:
    """The eval batches of each mixture component by name ({} when cfg is not a mixture)."""
    if cfg.corpus != Corpus.mixture:
        return {}
    return {
        name: pipeline.eval_batches(
            component_config(cfg, m), process_index, process_count, objective
        )
        for name, m in zip(names(cfg), cfg.mixture, strict=True)
    }
