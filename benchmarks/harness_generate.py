"""lm-eval `generate_until` requests per second of the flaxlm adapter on a local set of prompts.

Writes a run directory from an initialised tiny model (no training: the speed of decoding does
not depend on the weights), then answers N generate_until requests with prompts of varied
lengths (as a real task has) and prints requests per second, compilation included.

    python benchmarks/harness_generate.py --requests 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-gen-toks", type=int, default=16)
    args = parser.parse_args()

    import jax
    from lm_eval.api.instance import Instance

    from flaxlm import config
    from flaxlm.checkpoint import Checkpointer
    from flaxlm.data.tokenizer import ByteTokenizer
    from flaxlm.harness import FlaxLM
    from flaxlm.mesh import make_mesh
    from flaxlm.run_dir import write_run_files
    from flaxlm.train import Trainer

    run = Path(tempfile.mkdtemp()) / "run"
    cfg = config.load(
        Path(__file__).parent.parent / "configs" / "tiny.yaml", [f"train.run_dir={run}"]
    )
    trainer = Trainer(cfg, make_mesh(cfg, jax.devices()[:1]))
    write_run_files(run, cfg, ByteTokenizer())
    checkpointer = Checkpointer(run, cfg.checkpoint)
    checkpointer.save(1, trainer.init_state(0), None, cfg)
    checkpointer.wait()
    checkpointer.close()

    lm = FlaxLM(checkpoint=str(run), batch_size=8)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    requests = [
        Instance(
            request_type="generate_until", doc={}, idx=i,
            arguments=(" ".join(words[: 1 + i % 9]) * (1 + i % 3), {
                "max_gen_toks": args.max_gen_toks, "until": ["\n\n"]}),
        )
        for i in range(args.requests)
    ]  # fmt: skip
    start = time.perf_counter()
    out = lm.generate_until(requests)
    elapsed = time.perf_counter() - start
    assert len(out) == len(requests)
    print(json.dumps({"requests": len(requests), "seconds": round(elapsed, 1),
                      "requests_per_second": round(len(requests) / elapsed, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
