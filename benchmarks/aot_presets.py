"""Which presets fit which TPU pods: the train step compiled ahead of time (needs libtpu).

    JAX_PLATFORMS=cpu python benchmarks/aot_presets.py [--only llama3-8b]

For each (preset, pod) below it compiles the train step in bfloat16 (float32 master weights)
with FSDP over the pod, trying its remat choices in order until one fits, and prints a Markdown
table row and a JSON line: per-device memory (XLA's analysis and the analytic estimate), the
chip's HBM, FLOPs per step, and the roofline step time of the compiled program
(`flaxlm.hlo_cost`; a floor with splash attention, which it prices by its bytes alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flaxlm import aot, config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# (preset, topology, global batch, sequence length, remat choices tried in order, overrides).
# Llama runs at 8K context use splash attention (the XLA kernel materialises the T x T scores)
# and full remat (nothing less fits at one sequence per chip).
SPLASH = ["model.attention=splash"]
CASES = [
    ("gpt2-1.5b", "v5e:2x2", 16, 1024, ("none", "full"), []),
    ("gpt2-1.5b", "v5p:2x2x1", 32, 1024, ("none", "full"), []),
    ("llama3-8b", "v5p:2x2x2", 8, 8192, ("full",), SPLASH),
    ("llama3-8b", "v6e:4x4", 16, 8192, ("full",), SPLASH),
    ("llama3-70b", "v5p:4x4x4", 64, 8192, ("full",), SPLASH),
    ("llama3-70b", "v6e:8x8", 64, 4096, ("full",), SPLASH),
    ("llama3-70b", "v6e:16x16", 256, 4096, ("full",), SPLASH),
    # Long context: one row per step split over the chips by context parallelism (parameters
    # FSDP over the same axis).
    ("llama3-8b", "v5p:2x2x1", 1, 32768, ("full",), [*SPLASH, "mesh.fsdp=1", "mesh.context=4"]),
    ("llama3-8b", "v5p:2x2x1", 1, 131072, ("full",), [*SPLASH, "mesh.fsdp=1", "mesh.context=4"]),
    # Mixtral 8x7B: experts split 8 ways (one per device along `expert`), FSDP across the rest.
    ("mixtral-8x7b", "v5p:2x2x4", 16, 4096, ("full",), [*SPLASH, "mesh.expert=8"]),
    ("mixtral-8x7b", "v5p:4x4x4", 64, 4096, ("full",), [*SPLASH, "mesh.expert=8"]),
]


def run_case(preset, topology, batch, seq, remats, extra) -> dict:
    report = {}
    for remat in remats:
        cfg = config.load(
            CONFIGS / "models" / f"{preset}.yaml",
            [
                "model.dtype=bfloat16",
                "model.param_dtype=float32",
                f"model.remat={remat}",
                f"data.global_batch_size={batch}",
                f"data.seq_len={seq}",
                f"model.max_seq_len={max(seq, 1024)}",
                *extra,
            ],
        )
        report = aot.compile_report(cfg, topology)
        report["preset"] = preset
        if report["fits"]:
            break
    return report


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the cases of this preset only")
    parser.add_argument("--topology", help="run the cases on this topology only")
    args = parser.parse_args()
    print(
        "| preset | pod | mesh | batch x seq | remat | XLA GiB/device | estimate GiB | HBM GiB "
        "| fits | TFLOP/step | roofline s |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for preset, topology, batch, seq, remats, extra in CASES:
        if (args.only and preset != args.only) or (args.topology and topology != args.topology):
            continue
        print(f"compiling {preset} on {topology} {extra} ...", file=sys.stderr, flush=True)
        r = run_case(preset, topology, batch, seq, remats, extra)
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        xla = r["memory_per_device"]["total_gib"] if r["memory_per_device"] else float("nan")
        print(
            f"| {preset} | {topology} ({r['chips']} chips) | {mesh} | {batch} x {seq} "
            f"| {r['remat']} | {xla:.1f} "
            f"| {r['estimate_per_device']['total_gib']:.1f} | {r['hbm_per_device_gib']:.0f} "
            f"| {'yes' if r['fits'] else 'no'} | {r['analytic_flops_per_step'] / 1e12:,.0f} "
            f"| {_seconds(r['roofline_step_seconds'])} |",
            flush=True,
        )
        print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
