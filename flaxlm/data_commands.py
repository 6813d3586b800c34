"""The data tools of `flaxlm`: train a tokenizer, build a TFDS dataset, tokenize into a cache.

Registered into `flaxlm.commands.COMMANDS` like every subcommand (see there).
"""

from __future__ import annotations

import argparse
import sys

from flaxlm.commands import _config, arg, command, config_file


@command(
    "tokenizer train",
    "train a SentencePiece model on a config's data",
    config_file("YAML config file (its data.* is read)"),
    arg("--vocab-size", type=int, required=True),
    arg("--output", required=True, help="directory for sentencepiece.model"),
    arg("--model-type", default="bpe", choices=["bpe", "unigram"]),
    arg("--max-bytes", type=int, default=200_000_000, help="text to read at most"),
)
def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from flaxlm.data.train_tokenizer import train_sentencepiece

    path = train_sentencepiece(
        cfg.data, args.vocab_size, args.output, args.model_type, args.max_bytes
    )
    print(f"wrote {path}; train with data.tokenizer=sentencepiece data.tokenizer_path={path}")


@command(
    "data build-tfds",
    "prepare local text as a versioned TFDS dataset",
    arg("--train-files", required=True, help="glob of .txt/.jsonl/.tfrecord"),
    arg("--eval-files", default=None, help="glob for the validation split"),
    arg("--data-dir", required=True, help="TFDS data directory"),
    arg("--text-field", default="text"),
    arg("--name", default="flaxlm_text", help="TFDS dataset name"),
    arg("--version", default="1.0.0", help="dataset version, MAJOR.MINOR.PATCH"),
    arg("--overwrite", action="store_true", help="rebuild a dataset already prepared there"),
)
def cmd_data_build_tfds(args: argparse.Namespace) -> None:
    from flaxlm.data.tfds_builder import build, train_overrides

    names = ("train_files", "data_dir", "eval_files", "text_field", "overwrite", "name", "version")
    path = build(**{key: getattr(args, key) for key in names})
    then = train_overrides(args.data_dir, args.name, args.version, bool(args.eval_files))
    print(f"wrote {path}; train with {then}")


@command(
    "data tokenize",
    "tokenize a config's train split once into data.token_cache (read by index when training)",
    config_file("YAML config file (its data.* is read)"),
    arg("--overwrite", action="store_true", help="rebuild a cache already there"),
)
def cmd_data_tokenize(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from flaxlm.data.token_cache import build

    meta = build(cfg.data, args.overwrite, log=lambda line: print(line, file=sys.stderr))
    tokens = sum(part["tokens"] for part in meta["sources"])
    print(
        f"wrote {tokens:,} tokens to {cfg.data.token_cache}; train with the same config and "
        f"data.token_cache={cfg.data.token_cache}"
    )
