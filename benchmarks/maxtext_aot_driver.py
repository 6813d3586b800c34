"""MaxText's train step compiled for a TPU topology; runs in MaxText's own virtual environment.

    VENV/bin/python benchmarks/maxtext_aot_driver.py HLO_OUT key=value ...

The key=value arguments go to MaxText's `train_compile` (with its packaged base.yml) as they
would on its command line (compile_topology=v5p-16 model_name=llama3-8b ...). The compiled
program's HLO text is written to HLO_OUT, and one JSON line starting with `AOT_RESULT ` gives
XLA's memory analysis (bytes per device), its cost analysis and the library versions. It
imports nothing from flaxlm: benchmarks/aot_vs_maxtext.py runs it and reads its result.
"""

import json
import sys
import time
from importlib import metadata
from pathlib import Path


def main() -> None:
    hlo_out, overrides = sys.argv[1], sys.argv[2:]
    from maxtext.trainers.pre_train import train_compile

    base_yml = Path(train_compile.__file__).resolve().parents[2] / "configs" / "base.yml"
    captured = {}
    original = train_compile.jit_and_compile

    def capture(*args, **kwargs):  # keeps the compiled object that main() only prints
        started = time.perf_counter()
        captured["compiled"] = original(*args, **kwargs)
        captured["seconds"] = time.perf_counter() - started
        return captured["compiled"]

    train_compile.jit_and_compile = capture
    train_compile.main(["train_compile", str(base_yml), *overrides])
    compiled = captured["compiled"]
    ma = compiled.memory_analysis()
    memory = {
        name: int(getattr(ma, name, 0) or 0)
        for name in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "alias_size_in_bytes",
            "temp_size_in_bytes",
            "generated_code_size_in_bytes",
            "peak_memory_in_bytes",
        )
    }
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    keys = ("flops", "bytes accessed", "optimal_seconds")
    Path(hlo_out).write_text(compiled.as_text())
    versions = {p: metadata.version(p) for p in ("maxtext", "jax", "jaxlib", "libtpu", "flax")}
    result = {
        "memory": memory,
        "cost": {k: float(cost[k]) for k in keys if k in (cost or {})},
        "compile_seconds": captured["seconds"],
        "versions": versions,
    }
    print("AOT_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
