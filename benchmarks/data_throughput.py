"""Input pipeline throughput against what the training step consumes, measured in one run.

    python benchmarks/data_throughput.py [--config configs/quickstart.yaml] [--batches 200]
        [--sp-vocab 1024] [--train-steps 20]

1. Trains the train step of the config (compiled and warmed up first) on a fixed batch and
   measures the tokens/s it consumes on this machine (the pipeline is not involved).
2. Times the pipeline alone (train split, this process's batches, tokenized, packed, shuffled)
   for the byte tokenizer and for a SentencePiece model trained on the same corpus, after a
   warm-up of a few batches; both loaders: the streaming tf.data pipeline, and the token cache
   read by index (`flaxlm data tokenize`, built here into a temporary directory first).
3. Prints one JSON line per tokenizer and loader with tokens/s of each and the ratio pipeline /
   train step (the target is at least 10), the padding fraction of the rows, and the size of
   the data position a checkpoint saves (the tf.data iterator with its shuffle buffer, or the
   token cache's position.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from flaxlm import config
from flaxlm.data import packing, pipeline, token_cache
from flaxlm.data.train_tokenizer import train_sentencepiece
from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer


def train_tokens_per_second(cfg, steps: int) -> float:
    trainer = Trainer(cfg, make_mesh(cfg))
    state = trainer.init_state(0)
    batch = trainer.global_batch(next(pipeline.train_iterator(cfg.data, 0)))
    for _ in range(3):  # compile and warm up
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    return steps * cfg.data.global_batch_size * cfg.data.seq_len / elapsed


def pipeline_tokens_per_second(data_cfg, batches: int, saved: Path) -> tuple[float, float, int]:
    """tokens/s and padding of the train iterator, and the bytes of its saved position."""
    it = pipeline.train_iterator(data_cfg, seed=0)
    for _ in range(5):  # warm up: file reads, tokenizer loading, the shuffle buffer
        next(it)
    start = time.perf_counter()
    padding = []
    for _ in range(batches):
        batch = next(it)
        padding.append(packing.padding_fraction(batch))
    elapsed = time.perf_counter() - start
    it.save(saved)
    it.close()
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    tokens = batches * data_cfg.global_batch_size * data_cfg.seq_len
    return tokens / elapsed, float(np.mean(padding)), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--sp-vocab", type=int, default=1024)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config.load(args.config, args.overrides)
    train = train_tokens_per_second(cfg, args.train_steps)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_sentencepiece(cfg.data, args.sp_vocab, tmp, max_bytes=2_000_000)
        sp_cfg = config.load(
            args.config,
            [*args.overrides, "data.tokenizer=sentencepiece", f"data.tokenizer_path={sp}"],
        )
        for name, base in (("byte", cfg.data), ("sentencepiece", sp_cfg.data)):
            cache = os.path.join(tmp, f"cache-{name}")
            indexed = dataclasses.replace(base, token_cache=cache)
            token_cache.build(indexed, log=lambda _: None)
            for loader, data_cfg in (("stream", base), ("token_cache", indexed)):
                saved = Path(tmp) / f"position-{name}-{loader}"
                rate, padding, size = pipeline_tokens_per_second(data_cfg, args.batches, saved)
                record = {
                    "config": args.config,
                    "tokenizer": name,
                    "loader": loader,
                    "pipeline_tokens_per_second": round(rate),
                    "train_step_tokens_per_second": round(train),
                    "ratio": round(rate / train, 1),
                    "padding_fraction": padding,
                    "data_state_bytes": size,
                    "devices": jax.device_count(),
                }
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
