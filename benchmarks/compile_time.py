"""Compile time of the train step against depth, with and without nn.scan over layers.

    python benchmarks/compile_time.py [--layers 4 16 64]

Prints one JSON line per (layers, scan) with the seconds to lower and compile the jitted train
step of a small GPT-2 shaped model (d_model 256) on one CPU device. With scan the compiled
program holds one block whatever the depth, so its compile time stays roughly flat; unrolled,
it grows with the number of layers.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from flaxlm import config
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer


def compile_seconds(layers: int, scan: bool) -> float:
    cfg = config.load(
        None,
        [
            "model.d_model=256",
            "model.n_heads=4",
            "model.d_ff=1024",
            f"model.n_layers={layers}",
            f"model.scan_layers={scan}",
            "model.max_seq_len=128",
            "data.seq_len=128",
        ],
    )
    trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
    start = time.perf_counter()
    trainer.compile_step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    for layers in args.layers:
        for scan in (False, True):
            seconds = compile_seconds(layers, scan)
            print(
                json.dumps({"layers": layers, "scan": scan, "compile_seconds": round(seconds, 2)})
            )


if __name__ == "__main__":
    main()
