"""Does the training loop stall the device? flaxlm.loop against a bare jitted loop.

    python benchmarks/host_stall.py [--steps 300 --repeats 3]

With a trivial model (one layer, d_model 32, 2,048 tokens per step) a step takes a few
milliseconds, so any host work the loop puts between steps (reading the data pipeline, building
the global batch, reading metrics back, logging) shows as lost steps per second. Both sides run
the same `Trainer` step:

- bare: `state, metrics = step(state, batch)` in a Python loop on one batch already on the
  devices, blocking only at the end of each window of 10 steps (the median window counts);
- loop: `flaxlm.loop.run` (tf.data pipeline, metrics read one step late, logging every 10 steps;
  no evaluation in between, one checkpoint at the end), timed by its own log records: the median
  of the per-window step times, which excludes compilation, the evaluations and the checkpoint.

Rounds alternate bare, loop, bare, loop, ...; prints steps/s of each (median over rounds) and the
ratio loop / bare (target: >= 0.95), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from flaxlm import config as config_lib  # noqa: E402
from flaxlm import loop  # noqa: E402
from flaxlm.mesh import make_mesh  # noqa: E402
from flaxlm.train import Trainer  # noqa: E402

TRIVIAL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.global_batch_size=32",
    "mesh.data=1",
    "mesh.fsdp=1",
]


def trivial_config(run_dir: Path, steps: int, extra: list[str]) -> config_lib.Config:
    return config_lib.load(
        REPO / "configs" / "tiny.yaml",
        [
            *TRIVIAL,
            f"train.steps={steps}",
            f"train.run_dir={run_dir}",
            "train.log_every=10",
            "train.eval_every=0",
            f"checkpoint.every_steps={steps}",
            "checkpoint.async_save=false",
            "data.eval_batches=1",
            "train.progress_bar=false",
            "train.tensorboard=false",
            "train.sample_prompt=",
            *extra,
        ],
    )


def bare_steps_per_second(cfg: config_lib.Config, steps: int, window: int = 10) -> float:
    trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
    state = trainer.init_state(0)
    synthetic = trainer.synthetic_batch()
    # Constant token ids (the step's time does not depend on them).
    batch = trainer.global_batch({**synthetic, "tokens": np.ones_like(synthetic["tokens"])})
    state, metrics = trainer.step(state, batch)  # compile
    jax.block_until_ready(metrics)
    # Windows of `window` steps, as the loop logs them; the median window, as the loop reports.
    rates = []
    for _ in range(steps // window):
        start = time.perf_counter()
        for _ in range(window):
            state, metrics = trainer.step(state, batch)
        jax.block_until_ready((state, metrics))
        rates.append(window / (time.perf_counter() - start))
    return statistics.median(rates)


def loop_steps_per_second(cfg: config_lib.Config) -> float:
    summary = loop.run(cfg)
    return 1.0 / summary.median_step_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    bare, looped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cfg = trivial_config(Path(tmp) / f"run{r}", args.steps, args.set)
            bare.append(bare_steps_per_second(cfg, args.steps))
            looped.append(loop_steps_per_second(cfg))
            print(
                f"  round {r + 1}: bare {bare[-1]:.1f} steps/s, loop {looped[-1]:.1f} steps/s",
                file=sys.stderr,
                flush=True,
            )
    b, lo = statistics.median(bare), statistics.median(looped)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    print("| runner | steps/s | tokens/s |")
    print("| --- | ---: | ---: |")
    print(f"| bare jitted loop | {b:.1f} | {b * tokens:,.0f} |")
    print(f"| flaxlm.loop.run | {lo:.1f} | {lo * tokens:,.0f} |")
    print(f"loop / bare = {lo / b:.3f} (target >= 0.95)")
    print(
        json.dumps(
            {"benchmark": "host_stall", "bare": bare, "loop": looped, "ratio": lo / b},
        )
    )


if __name__ == "__main__":
    main()
