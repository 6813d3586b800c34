"""Where the time of flaxlm's train step goes on CPU: a jax.profiler trace, summed by XLA op.

    python benchmarks/profile_step.py [--steps 3] [--top 25] [--set key=value ...]

Compiles the train step of `configs/bench/gpt2-23m.yaml` with XLA's per-op trace events on
(`xla_cpu_enable_xprof_traceme`), traces a few steps with `jax.profiler`, and prints the XLA
operations (fusions, dots, copies) that took the most time, grouped by kind, as shares of the
traced device time. The trace stays in a temporary directory unless `--keep DIR`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from flaxlm import config as config_lib  # noqa: E402
from flaxlm.mesh import make_mesh  # noqa: E402
from flaxlm.train import Trainer  # noqa: E402


def kind(name: str) -> str:
    """An op's family from its HLO name: dot, fusion, copy, transpose, ..."""
    base = re.sub(r"[._]\d+$", "", name)
    base = re.sub(r"\.\d+$", "", base)
    return base.split(".")[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "bench" / "gpt2-23m.yaml")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--keep", type=Path, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    cfg = config_lib.load(args.config, args.set)
    trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
    state = trainer.init_state(0)
    batch = trainer.global_batch(trainer.synthetic_batch(0))
    compiled = trainer.compile_step(compiler_options={"xla_cpu_enable_xprof_traceme": True})
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    directory = args.keep or Path(tempfile.mkdtemp())
    jax.profiler.start_trace(str(directory))
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    jax.profiler.stop_trace()

    [path] = glob.glob(str(directory / "**" / "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.loads(f.read())["traceEvents"]
    # XLA op events are named after their HLO instruction: `fusion.12`, `dot.3`, `copy`, ...
    op_name = re.compile(r"[a-z][a-z0-9_\-]*(\.\d+)?")
    by_op: dict[str, float] = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and op_name.fullmatch(name):
            by_op[name] += e["dur"] / 1e3 / args.steps
    total = sum(by_op.values())
    by_kind: dict[str, float] = collections.Counter()
    for name, ms in by_op.items():
        by_kind[kind(name)] += ms
    print(f"traced op time per step: {total:.1f} ms (summed over threads)")
    print("\n| op kind | ms/step | share |\n| --- | ---: | ---: |")
    for k, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])[:12]:
        print(f"| {k} | {ms:.1f} | {ms / total:.3f} |")
    print("\n| top ops | ms/step | share |\n| --- | ---: | ---: |")
    for name, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {name} | {ms:.1f} | {ms / total:.3f} |")


if __name__ == "__main__":
    main()
