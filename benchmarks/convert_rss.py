"""Peak host memory (RSS) of `convert from-hf` and `convert to-hf` against model size.

For each Llama shape a random bfloat16 Hugging Face checkpoint is written tensor by tensor
(sharded safetensors, 2 GiB per file), then converted in a fresh process that records its
resident memory before converting (imports, devices: the fixed overhead) and its peak. On CPU the
"devices" are host memory, so the converted parameters (and the optimizer state written with
them) are resident in this process by design; the conversion's own host cost is
peak - baseline - device-resident bytes, to be compared with the largest single tensor.

    python benchmarks/convert_rss.py --shapes 125m 1b [--workdir /tmp/rss]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SHAPES = {  # Llama-shaped: vocab, d_model, layers, heads, kv heads, d_ff, tied
    "125m": (32000, 768, 12, 12, 4, 3072, True),
    "1b": (128256, 2048, 16, 32, 8, 8192, True),
    "3b": (128256, 3072, 28, 24, 8, 8192, True),
}
# Adafactor without momentum (b1=0): its step-0 state is the factored second moments only, small
# beside the parameters (with momentum it is a float32 copy of them, 2x the bf16 parameters).
OVERRIDES = ["optimizer.name=adafactor", "optimizer.b1=0", "data.seq_len=128", "mesh.fsdp=-1"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_random_checkpoint(shape: str, dst: Path) -> tuple[int, int]:
    """A random bf16 Llama checkpoint; (parameters, bytes of the largest tensor)."""
    import ml_dtypes

    from flaxlm.convert.safetensors_io import write_sharded

    vocab, d, layers, heads, kv, ff, tied = SHAPES[shape]
    hd = d // heads
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (heads * hd, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.o_proj.weight": (d, heads * hd),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
        })  # fmt: skip
    rng = np.random.default_rng(0)

    def tensors():
        for name, s in shapes.items():
            yield name, (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    dst.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors(), dst, 2 * 2**30)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "intermediate_size": ff,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config))
    sizes = [int(np.prod(s)) for s in shapes.values()]
    return sum(sizes), 2 * max(sizes)


class _StagePeaks:
    """The peak RSS within each stage of a conversion (a wrapped function's run, or the time
    from its end to the next one's start), sampled every few milliseconds by a thread."""

    def __init__(self):
        self.stage, self.peaks = "start", {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            rss = _rss_bytes()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
            time.sleep(0.005)

    def wrap(self, module, name: str) -> None:
        inner = getattr(module, name)

        def staged(*args, **kwargs):
            self.stage = name
            try:
                return inner(*args, **kwargs)
            finally:
                self.stage = f"after {name}"

        setattr(module, name, staged)


def child(direction: str, src: str, dst: str) -> None:
    """Runs one conversion; prints baseline, peak and each stage's peak RSS as JSON."""
    import jax
    import orbax.checkpoint  # noqa: F401

    import flaxlm.checkpoint
    import flaxlm.run_dir
    import flaxlm.train
    from flaxlm import convert
    from flaxlm.convert import directories

    jax.devices()
    # The fixed overhead: interpreter, JAX, Orbax, TensorFlow and flaxlm imported, devices up.
    baseline = _rss_bytes()
    stages = _StagePeaks()
    for module, name in (
        (directories, "place_params"),
        (flaxlm.run_dir, "write_checkpoint"),
        (flaxlm.run_dir, "load_run"),
        (directories, "write_sharded"),
    ):
        stages.wrap(module, name)
    if direction == "from-hf":
        cfg = convert.from_hf(src, dst, OVERRIDES)
        del cfg
    else:
        convert.to_hf(src, dst)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "stages": stages.peaks}))


def _run_child(direction: str, src: Path, dst: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, __file__, "--child", direction, str(src), str(dst)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["125m", "1b"])
    parser.add_argument("--workdir", default="/tmp/flaxlm-convert-rss")
    parser.add_argument("--child", nargs=3, default=None)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    gib = 2**30
    print(
        "| shape | params | largest tensor | direction | baseline | peak | device-resident "
        "| host overhead = peak - baseline - device | overhead / largest |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    stage_rows = []
    for shape in args.shapes:
        work = Path(args.workdir) / shape
        shutil.rmtree(work, ignore_errors=True)
        n, largest = write_random_checkpoint(shape, work / "hf")
        for direction, src, dst in (
            ("from-hf", work / "hf", work / "run"),
            ("to-hf", work / "run", work / "out"),
        ):
            r = _run_child(direction, src, dst)
            # The bf16 parameters live on the (CPU) devices in both directions; Adafactor's
            # factored state (no momentum) is small beside them.
            r["device_bytes"] = 2 * n
            over = r["peak"] - r["baseline"] - r["device_bytes"]
            print(f"| {shape} | {n / 1e9:.3f} B | {largest / gib:.3f} GiB | {direction} | "
                  f"{r['baseline'] / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB | "
                  f"{r['device_bytes'] / gib:.2f} GiB | {over / gib:.2f} GiB | "
                  f"{over / largest:.2f} |", flush=True)  # fmt: skip
            stage_rows.append(
                f"| {shape} | {direction} | "
                + ", ".join(f"{k} {v / gib:.2f}" for k, v in r["stages"].items())
                + " |"
            )
        shutil.rmtree(work, ignore_errors=True)
    print("\nPeak RSS (GiB) within each stage of the conversion:\n")
    print("| shape | direction | stage peaks |\n|---|---|---|")
    print("\n".join(stage_rows))


if __name__ == "__main__":
    main()
