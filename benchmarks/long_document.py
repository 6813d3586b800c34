"""Peak memory of the data pipeline on one very long single-line document.

Writes a JSON-lines file whose first document is one line of SIZE_MB megabytes (words without a
newline) followed by 200 short documents, builds the train pipeline on it (byte tokenizer, or a
small byte-level BPE trained here with `--tokenizer hf`), draws batches until the long document
has been consumed, and prints the peak resident memory of the process and the tokens per second.

    python benchmarks/long_document.py --size-mb 10 --tokenizer byte
    python benchmarks/long_document.py --size-mb 10 --tokenizer hf
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def _hf_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 200, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=float, default=10)
    parser.add_argument("--tokenizer", choices=["byte", "hf"], default="byte")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from flaxlm import config
    from flaxlm.data import pipeline

    work = Path(tempfile.mkdtemp())
    words = ("lorem ipsum dolor sit amet consectetur " * 1000).encode()
    long_text = (words * (int(args.size_mb * 2**20) // len(words) + 1))[: int(args.size_mb * 2**20)]
    with open(work / "docs.jsonl", "w") as f:
        f.write(json.dumps({"text": long_text.decode()}) + "\n")
        for i in range(200):
            f.write(json.dumps({"text": f"short document {i}"}) + "\n")
    tok = ["data.tokenizer=byte"]
    if args.tokenizer == "hf":
        tok = ["data.tokenizer=hf", f"data.tokenizer_path={_hf_tokenizer(work)}"]
    cfg = config.load(
        None,
        [
            "data.corpus=files", f"data.train_files={work / 'docs.jsonl'}",
            f"data.seq_len={args.seq_len}", f"data.global_batch_size={args.batch}",
            "model.vocab_size=512", "mesh.fsdp=1", "data.shuffle_buffer=1", *tok,
        ],
    )  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    it = pipeline.train_iterator(cfg.data, seed=0)
    tokens = 0
    first = time.perf_counter()
    for n in range(50):
        batch = next(it)
        tokens += batch["tokens"].size if "tokens" in batch else args.batch * args.seq_len
        if n == 0:
            first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "size_mb": args.size_mb,
                "tokenizer": args.tokenizer,
                "peak_rss_mb": round(peak),
                "rss_before_pipeline_mb": round(before),
                "first_batch_seconds": round(first, 2),
                "tokens_per_second": round(tokens / elapsed),
            }
        )
    )


if __name__ == "__main__":
    main()
