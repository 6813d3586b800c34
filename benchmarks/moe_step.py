"""A mixture-of-experts train step against the dense step with the same active parameters.

    python benchmarks/moe_step.py [--steps 10 --rounds 3 --dispatch dropless]

The dense model is a Llama-shaped stack (d_model 256, 4 layers, SwiGLU width 1024); the MoE
model replaces every MLP by 8 experts of width 512 with 2 per token, so each token goes through
the same number of MLP parameters (plus a 256 x 8 router). Both run on one CPU device with the
same batch; rounds alternate between the two (the machine may be shared) and each figure is the
median over all timed steps. Prints ms/step, tokens/s, the MoE/dense time ratio and one JSON
line.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from flaxlm import config as config_lib  # noqa: E402
from flaxlm.flops import active_param_count, analytic_param_count  # noqa: E402
from flaxlm.mesh import make_mesh  # noqa: E402
from flaxlm.train import Trainer  # noqa: E402

BASE = [
    "model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4",
    "model.d_ff=1024", "model.norm=rmsnorm", "model.mlp=swiglu", "model.position=rope",
    "model.use_bias=false", "model.tie_embeddings=false", "model.max_seq_len=256",
    "data.seq_len=256", "data.global_batch_size=8", "optimizer.warmup_steps=0", "mesh.fsdp=1",
]  # fmt: skip
MOE = ["model.moe.num_experts=8", "model.moe.experts_per_token=2", "model.moe.d_expert=512"]


def _trainer(overrides: list[str]) -> Trainer:
    cfg = config_lib.load(REPO / "configs" / "tiny.yaml", [*BASE, *overrides])
    return Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dispatch", default="dropless", choices=["dropless", "capacity"])
    args = parser.parse_args()
    variants = {"dense": [], "moe": [*MOE, f"model.moe.dispatch={args.dispatch}"]}
    runs = {}
    for name, overrides in variants.items():
        trainer = _trainer(overrides)
        state = trainer.init_state(0)
        batch = trainer.global_batch(trainer.synthetic_batch(0))
        state, metrics = trainer.step(state, batch)  # compile and warm up
        float(metrics["loss"])
        runs[name] = [trainer, state, batch, []]
    for _ in range(args.rounds):
        for run in runs.values():
            trainer, state, batch, times = run
            for _ in range(args.steps):
                start = time.perf_counter()
                state, metrics = trainer.step(state, batch)
                float(metrics["loss"])
                times.append(time.perf_counter() - start)
            run[1] = state
    tokens = 8 * 256
    record = {"dispatch": args.dispatch, "steps": args.steps * args.rounds}
    print("| model | params | active params | ms/step | tokens/s |\n|---|---|---|---|---|")
    for name, (trainer, _, _, times) in runs.items():
        median = statistics.median(times)
        m = trainer.cfg.model
        total, active = analytic_param_count(m), active_param_count(m)
        print(f"| {name} | {total:,} | {active:,} | {median * 1e3:.1f} | {tokens / median:,.0f} |")
        record[name] = {"params": total, "active_params": active, "step_seconds": median}
    record["moe_over_dense_time"] = record["moe"]["step_seconds"] / record["dense"]["step_seconds"]
    print(f"MoE / dense step time: {record['moe_over_dense_time']:.2f}")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
