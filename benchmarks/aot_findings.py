"""One preset's train step compiled for a TPU topology: what the compiled program holds.

    JAX_PLATFORMS=cpu python benchmarks/aot_findings.py llama3-8b v5p:2x2x2 \
        --batch 8 --seq 8192 --layers 4 [--scan] [key=value ...]

Prints one JSON line per device program: XLA's memory analysis (arguments, temporaries, live
bytes), its cost analysis (FLOPs, bytes accessed, estimated seconds on v5p; a loop body counts
once, so compare unrolled programs, or scale by the trip count) and the collectives by kind
(count and bytes per device). It uses only `Trainer` and `flaxlm.xla_stats`, so the same
script measures any revision of the tree. bfloat16 compute, float32 master weights, full remat,
splash attention for Llama (as in the presets table) unless overridden.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flaxlm import aot, config, xla_stats
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GiB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset")
    parser.add_argument("topology")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--label", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [
        "model.dtype=bfloat16",
        "model.param_dtype=float32",
        "model.remat=full",
        f"model.scan_layers={str(args.scan).lower()}",
        f"data.global_batch_size={args.batch}",
        f"data.seq_len={args.seq}",
        f"model.max_seq_len={max(args.seq, 1024)}",
        *([f"model.n_layers={args.layers}"] if args.layers else []),
        *(["model.attention=splash"] if args.preset.startswith("llama") else []),
        *args.overrides,
    ]
    cfg = config.load(CONFIGS / "models" / f"{args.preset}.yaml", overrides)
    trainer = Trainer(cfg, make_mesh(cfg, aot.topology_devices(args.topology)))
    started = time.perf_counter()
    compiled = trainer.compile_step()
    seconds = time.perf_counter() - started
    mem = xla_stats.memory_stats(compiled)
    cost = xla_stats.cost_stats(compiled)
    collectives = xla_stats.collective_stats(compiled.as_text())
    row = {
        "label": args.label,
        "preset": args.preset,
        "topology": args.topology,
        "layers": cfg.model.n_layers,
        "scan": args.scan,
        "batch_x_seq": f"{args.batch} x {args.seq}",
        "overrides": args.overrides,
        "arguments_gib": round(mem["arguments"] / GiB, 2),
        "temporaries_gib": round(mem["temporaries"] / GiB, 2),
        "live_gib": round(mem["live"] / GiB, 2),
        "tflops": round(cost.get("flops", 0) / 1e12, 2),
        "bytes_accessed_gb": round(cost.get("bytes_accessed", 0) / 1e9, 1),
        "xla_seconds": cost.get("optimal_seconds"),
        "collective_gb": round(sum(c["bytes"] for c in collectives.values()) / 1e9, 2),
        "collectives": collectives,
        "compile_seconds": round(seconds),
    }
    print(json.dumps(row), flush=True)
    print(f"done in {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
