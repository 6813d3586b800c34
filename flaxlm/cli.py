"""The `flaxlm` command line: train, evaluate, generate, compile, export, convert, tools.

    flaxlm train    --config configs/X.yaml [--config MORE.yaml ...] [key.sub=value ...]
    flaxlm eval     --checkpoint RUN_DIR [--step N | --all-steps] [key.sub=value ...]
    flaxlm generate --checkpoint RUN_DIR [--step N] --prompt TEXT [--prompt TEXT ...]
                    [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                    [--stop TEXT ...] [--seed S]
    flaxlm fill-mask --checkpoint RUN_DIR [--step N] --text "... [MASK] ..." [--top-k K]
    flaxlm compile  --config configs/X.yaml --topology v5p:4x4x4 [--slices N] [key.sub=value ...]
    flaxlm plan     --config configs/X.yaml [--topology v5p:4x4x4] [--slices N] [--global-batch B]
                    [--top K] [--compile N] [--jobs J] [--scan {config,both}] [--remat R ...]
                    [--hbm-gib G] [--cache DIR] [--out DIR] [--apply OUT.yaml] [key.sub=value ...]
    flaxlm export   --checkpoint RUN_DIR [--step N] DST
    flaxlm convert  {from-hf|to-hf} SRC DST [--step N] [--dtype D] [--max-shard-size BYTES]
                    [key.sub=value ...]
    flaxlm tokenizer train --config C --vocab-size N --output DIR [--model-type {bpe,unigram}]
                    [--max-bytes N] [key.sub=value ...]
    flaxlm data build-tfds --train-files GLOB [--eval-files GLOB] --data-dir DIR
                    [--name N] [--version V] [--text-field NAME] [--overwrite]
    flaxlm data tokenize --config C data.token_cache=DIR [--overwrite] [key.sub=value ...]
    flaxlm bench    --config configs/X.yaml [--steps N] [--warmup N] [key.sub=value ...]
    flaxlm sweep    mesh --config C --meshes 1x1x1 8x1x1 ... [--per-device-batch B] [--out DIR]
                    [--steps N] [--warmup N] [key.sub=value ...]
    flaxlm sweep    models --config C --models PRESET.yaml ... [--out DIR] [key.sub=value ...]
    flaxlm scaling  --config LADDER.yaml [--out DIR] [--separate-runs] [key.sub=value ...]
    flaxlm goodput  RUN_DIR
    flaxlm --version | --help | COMMAND --help

Results go to stdout (`eval` and `fill-mask` print one JSON object per line, `generate` the
text); progress and errors go to stderr. Exit status: 0 on success; 2 on a bad input and 1 on a
failed run (NaN loss, failed save, a spike with nothing to roll back to), each with a
one-paragraph message; 143 when
SIGTERM stopped training after a save; 75 when the hang watchdog ended a run that made no
progress (restart it: it resumes from its last checkpoint).
The subcommands and their arguments are the table in `flaxlm.commands`; handlers import JAX and
TensorFlow only once the config has loaded, so help, the version and config errors come at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from flaxlm import (
    __version__,
    data_commands,  # noqa: F401  (registers the data tools' commands)
)
from flaxlm.commands import COMMANDS
from flaxlm.plan import command as plan_command  # noqa: F401  (registers `flaxlm plan`)


def parser() -> argparse.ArgumentParser:
    """The argument parser of every registered command; the usage text is this module's."""
    top = argparse.ArgumentParser(
        prog="flaxlm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"flaxlm {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    tools: dict[str, Any] = {}  # "tokenizer" -> the sub-parsers of its actions
    for cmd in COMMANDS:
        where = sub
        if len(cmd.names) == 2:
            tool = cmd.names[0]
            if tool not in tools:
                tool_parser = sub.add_parser(tool, help=f"{tool} tools")
                tools[tool] = tool_parser.add_subparsers(dest="action", required=True)
            where = tools[tool]
        p = where.add_parser(cmd.names[-1], help=cmd.help)
        for add in cmd.arguments:
            add(p)
        p.set_defaults(handler=cmd.run)
    return top


# Errors that end a command with a message, not a traceback: (module, class, exit status, prefix),
# matched in order. Looked up among the modules already imported, so catching them imports
# nothing heavy: a handler that never imported a module cannot have raised its error.
_OUTCOMES = (
    ("flaxlm.config.enums", "ConfigError", 2, "error: "),
    ("builtins", "FileNotFoundError", 2, "error: "),
    ("flaxlm.run_state", "NonFiniteLossError", 1, "error: "),
    ("flaxlm.checkpoint", "CheckpointSaveError", 1, "error: "),
    ("flaxlm.spikes", "SpikeError", 1, "error: "),
    # 128 + SIGTERM, the status of a process ended by the signal, here after a clean save.
    ("flaxlm.preemption", "Preempted", 143, ""),
)


def _outcome(error: Exception) -> tuple[int, str] | None:
    """The exit status and message prefix of an expected error; None for a bug."""
    for module, name, status, prefix in _OUTCOMES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return status, prefix
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print(f"flaxlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        outcome = _outcome(e)
        if outcome is None:
            raise
        status, prefix = outcome
        print(f"flaxlm {args.command}: {prefix}{e}", file=sys.stderr)
        return status
    return 0


def _stdout_for_results_only() -> None:
    """Points the process's native stdout (file descriptor 1) at stderr, keeping Python's
    sys.stdout on the original: libraries that print from C++ (gloo's "[Gloo] Rank 0 is
    connected ..." lines, XLA) then cannot mix into the results scripts read from stdout."""
    sys.stdout.flush()
    results = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(results, "w", buffering=1, encoding="utf-8", closefd=True)  # noqa: SIM115


def entry() -> int:
    """The `flaxlm` command (console script and `python -m flaxlm.cli`)."""
    _stdout_for_results_only()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
