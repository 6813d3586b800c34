"""Per-device memory of the train step: XLA's analysis next to the analytic model.

    python benchmarks/memory_model.py [--preset gpt2-124m] [--batch 32] [--seq 512]

Compiles the train step of a GPT-2 preset on 8 CPU devices (nothing runs) for FSDP and data
parallelism, each without and with full rematerialization, and prints per device: XLA's
arguments, temporaries and total, and the analytic parameters, optimizer state, gradients,
activations and total (flaxlm/memory.py).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import sys
from pathlib import Path

from flaxlm import config, memory
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MESHES = {"fsdp=8": ["mesh.fsdp=8"], "data=8": ["mesh.data=8", "mesh.fsdp=1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    print(
        "| mesh | remat | XLA args | XLA temp | XLA total | est. params | est. optimizer "
        "| est. grads | est. activations | est. total |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for mesh_name, mesh in MESHES.items():
        for remat in ("none", "full"):
            cfg = config.load(
                CONFIGS / "models" / f"{args.preset}.yaml",
                [
                    *mesh,
                    f"model.remat={remat}",
                    "model.scan_layers=true",
                    f"data.global_batch_size={args.batch}",
                    f"data.seq_len={args.seq}",
                ],
            )
            trainer = Trainer(cfg, make_mesh(cfg))
            xla = memory.compiled_memory(trainer.compile_step())
            est = memory.estimate(cfg, trainer.abstract_state, dict(trainer.mesh.shape))
            e = est.to_json()
            print(
                f"| {mesh_name} | {remat} | {xla['arguments_gib']:.3f} | "
                f"{xla['temporaries_gib']:.3f} | {xla['total_gib']:.3f} | {e['params_gib']:.3f} "
                f"| {e['optimizer_gib']:.3f} | {e['gradients_gib']:.3f} "
                f"| {e['activations_gib']:.3f} | {e['total_gib']:.3f} |",
                flush=True,
            )
            row = {"mesh": mesh_name, "remat": remat, "xla": xla, "estimate": e}
            print(json.dumps(row), file=sys.stderr)


if __name__ == "__main__":
    main()
