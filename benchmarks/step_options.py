"""flaxlm's train step under different config options and XLA compiler options, side by side.

    python benchmarks/step_options.py --variant base \\
        --variant "ref:model.attention=reference" \\
        --variant "xnn:@xla_cpu_use_xnnpack=true" [--steps 10 --warmup 2 --repeats 3]

Each `--variant NAME:ITEM,ITEM,...` is a set of config overrides (`key.sub=value`) and XLA
debug options (`@option=value`, passed to `compile()` for that variant only, so that all variants
share one process and one machine state). The default config is `configs/bench/gpt2-23m.yaml`
on one device. Variants are interleaved round by round (the machine may be shared) and each
figure is the median over all its timed steps; each step feeds a batch and reads the loss back.
Prints a table of ms/step and the ratio to the first variant, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from flaxlm import config as config_lib  # noqa: E402
from flaxlm.mesh import make_mesh  # noqa: E402
from flaxlm.train import Trainer  # noqa: E402


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        return text


def parse_variant(spec: str) -> tuple[str, list[str], dict]:
    name, _, items = spec.partition(":")
    overrides, options = [], {}
    for item in filter(None, items.split(",")):
        if item.startswith("@"):
            key, _, value = item[1:].partition("=")
            options[key] = _value(value)
        else:
            overrides.append(item)
    return name, overrides, options


class Variant:
    def __init__(self, config: Path, overrides: list[str], options: dict):
        cfg = config_lib.load(config, overrides)
        self.trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
        self.state = self.trainer.init_state(0)
        # Each step brings its own tokens; positions and segments stay those of the synthetic
        # batch (one document per row).
        self.fixed = self.trainer.synthetic_batch()
        self.compiled = self.trainer.compile_step(compiler_options=options or None)

    def __call__(self, tokens: np.ndarray) -> float:
        batch = self.trainer.global_batch({**self.fixed, "tokens": tokens})
        self.state, metrics = self.compiled(self.state, batch)
        return float(metrics["loss"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "bench" / "gpt2-23m.yaml")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    specs = [parse_variant(s) for s in args.variant]
    variants = {name: Variant(args.config, o, x) for name, o, x in specs}
    cfg = next(iter(variants.values())).trainer.cfg
    rng = np.random.default_rng(0)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    batches = [rng.integers(0, cfg.model.vocab_size, shape, np.int32) for _ in range(8)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    for r in range(args.repeats):
        for name, step in variants.items():
            for i in range(args.warmup):
                step(batches[i % 8])
            for i in range(args.steps):
                t = time.perf_counter()
                losses[name] = step(batches[i % 8])
                times[name].append(time.perf_counter() - t)
            median = statistics.median(times[name][-args.steps :]) * 1e3
            print(f"  round {r + 1} {name}: {median:.1f} ms/step", file=sys.stderr, flush=True)
    base = statistics.median(next(iter(times.values())))
    print("| variant | settings | ms/step | speed vs first |")
    print("| --- | --- | ---: | ---: |")
    rows = []
    for name, overrides, options in specs:
        median = statistics.median(times[name])
        settings = " ".join([*overrides, *(f"@{k}={v}" for k, v in options.items())]) or "-"
        print(f"| {name} | {settings} | {median * 1e3:.1f} | {base / median:.3f} |")
        rows.append({"variant": name, "ms_per_step": median * 1e3, "speed_vs_first": base / median})
    print(json.dumps({"benchmark": "step_options", "rows": rows, "final_losses": losses}))


if __name__ == "__main__":
    main()
