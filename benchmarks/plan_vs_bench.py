"""The planner's ranking against measured step times, on the 8 CPU devices of this machine.

    python benchmarks/plan_vs_bench.py [--models configs/bench/cpu.yaml configs/bench/gpt2-23m.yaml]
        [--steps 5] [--warmup 2]

For each model it plans every candidate of a small space (data/fsdp/tensor meshes of 8
devices, remat none or full, 1 or 2 accumulation steps; `flaxlm.plan`), compiling all of them,
then times each candidate's train step with `flaxlm bench`. It prints, per model, the
candidates ranked by the plan beside their measured times, the Spearman rank correlation of
estimated and measured times, and the measured time of the plan's top pick over the best
measured (the planner's job is that ratio: at most 1.15). One JSON line per model goes to
benchmarks/results/plan-vs-bench.jsonl.

The CPU estimate: XLA:CPU runs collectives as synchronous copies, so the step is priced
serially, roofline compute plus collectives, with the host's rates measured at planning
time (a float32 matmul for the peak, an elementwise pass for the memory bandwidth, which also
prices the collectives), each shared by the 8 forced devices (`flaxlm.plan.compile`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scipy import stats  # noqa: E402

from flaxlm import config  # noqa: E402
from flaxlm.bench import bench  # noqa: E402
from flaxlm.config import Remat  # noqa: E402
from flaxlm.plan import planner  # noqa: E402
from flaxlm.plan.candidates import Space  # noqa: E402

QUIET = ["train.progress_bar=false", "train.tensorboard=false"]


def validate(path: str, steps: int, warmup: int) -> dict:
    cfg = config.load(REPO / path, QUIET)
    target = planner.make_target(None)
    space = Space(remats=(Remat.none, Remat.full), max_accum=2)
    result = planner.plan(cfg, target, space, compile_limit=10_000, progress=_say)
    measured = []
    for row in result.rows:
        laid_out = config.load(REPO / path, [*QUIET, *row["overrides"]])
        measured.append(bench(laid_out, steps, warmup)["step_seconds"])
        _say(f"{row['label']}: {measured[-1]:.4f} s measured, "
             f"{row['estimated_step_seconds']:.4f} s estimated")  # fmt: skip
    estimated = [row["estimated_step_seconds"] for row in result.rows]
    rho = stats.spearmanr(estimated, measured).statistic
    top_over_best = measured[0] / min(measured)
    print(f"\n### {path}: {len(measured)} candidates\n")
    print("| plan rank | layout | remat | accum | estimated s | measured s | measured rank |")
    print("|---|---|---|---|---|---|---|")
    order = sorted(range(len(measured)), key=measured.__getitem__)
    for i, row in enumerate(result.rows):
        print(f"| {row['rank']} | {row['layout']} | {row['remat']} | {row['grad_accum_steps']} "
              f"| {estimated[i]:.4f} | {measured[i]:.4f} | {order.index(i) + 1} |")  # fmt: skip
    print(f"\nSpearman rho {rho:.3f}; plan's top pick measured {top_over_best:.3f}x the best")
    return {
        "config": path,
        "candidates": len(measured),
        "spearman": rho,
        "top_pick_over_best_measured": top_over_best,
        "rates": target.rates,
        "rows": [
            {"label": r["label"], "estimated_step_seconds": e, "measured_step_seconds": m}
            for r, e, m in zip(result.rows, estimated, measured, strict=True)
        ],
    }


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["configs/bench/cpu.yaml", "configs/bench/gpt2-23m.yaml"]
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/plan-vs-bench.jsonl"))
    args = parser.parse_args()
    with open(args.out, "w") as f:
        for path in args.models:
            f.write(json.dumps(validate(path, args.steps, args.warmup)) + "\n")


if __name__ == "__main__":
    main()
