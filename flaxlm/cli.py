"""The `flaxlm` command line: train, eval, generate.

    flaxlm train    --config configs/X.yaml [key.sub=value ...]
    flaxlm eval     --checkpoint RUN_DIR [--step N] [key.sub=value ...]
    flaxlm generate --checkpoint RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                    [--seed S]

Results go to stdout (`eval` prints one JSON object per line, `generate` the text); progress and
errors go to stderr. Exit status: 0 on success; 2 on a bad input and 1 on a failed run (NaN loss,
failed save), each with a one-paragraph message; 143 when SIGTERM stopped training after a save.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flaxlm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (resumes if run_dir has checkpoints)")
    train.add_argument("--config", required=True, help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    ev = sub.add_parser("eval", help="evaluate a checkpoint: loss, perplexity, bits per byte")
    ev.add_argument("--checkpoint", required=True, help="run directory")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ev.add_argument("overrides", nargs="*", help="key.sub=value overrides (data.*, mesh.*)")

    gen = sub.add_parser("generate", help="continue a prompt with a trained model")
    gen.add_argument("--checkpoint", required=True, help="run directory")
    gen.add_argument("--step", type=int, default=None)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--seed", type=int, default=0)
    return parser


def _load_run(run_dir: str, step: int | None, overrides: list[str]):
    """The config saved in a run directory, a trainer on the local devices, and its params."""
    from flaxlm import config as config_lib
    from flaxlm.checkpoint import Checkpointer
    from flaxlm.config import ConfigError
    from flaxlm.mesh import make_mesh
    from flaxlm.train import Trainer

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a flaxlm run directory: it has no config.yaml")
    # The mesh of the devices at hand, whatever mesh trained the checkpoint.
    cfg = config_lib.load(path, ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", *overrides])
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    steps = checkpointer.all_steps()
    if not steps:
        raise ConfigError(f"{run_dir} has no checkpoints under {checkpointer.directory}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ConfigError(f"{run_dir} has no checkpoint at step {step}; it has steps {steps}")
    trainer = Trainer(cfg, make_mesh(cfg))
    params = checkpointer.restore_params(step, trainer.abstract_state.params)
    checkpointer.close()
    return cfg, trainer, params, step


def _train(args: argparse.Namespace) -> None:
    from flaxlm import config as config_lib
    from flaxlm.loop import run

    cfg = config_lib.load(args.config, args.overrides)
    summary = run(cfg)
    first, final = summary.first_eval, summary.final_eval
    lines = [
        f"trained steps {summary.start_step}..{summary.end_step} in {summary.wall_seconds:.0f} s"
    ]
    if first is not None:
        lines.append(f"bits per byte: {first['bits_per_byte']:.3f} at the start")
    lines.append(f"bits per byte: {final['bits_per_byte']:.3f} at the end")
    if summary.sample is not None:
        lines.append("sample:\n" + summary.sample)
    print("\n".join(lines), flush=True)


def _eval(args: argparse.Namespace) -> None:
    from flaxlm.data import pipeline
    from flaxlm.train import evaluate

    cfg, trainer, params, step = _load_run(args.checkpoint, args.step, args.overrides)
    batches = pipeline.eval_batches(cfg.data)
    result = evaluate(trainer, params, batches)
    print(json.dumps({"step": step, **result}), flush=True)


def _generate(args: argparse.Namespace) -> None:
    from flaxlm.loop import generate_text

    _, trainer, params, _ = _load_run(args.checkpoint, args.step, [])
    text = generate_text(
        trainer, params, args.prompt, args.max_new_tokens, args.temperature, args.seed
    )
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from flaxlm.checkpoint import CheckpointSaveError
    from flaxlm.config import ConfigError
    from flaxlm.loop import NonFiniteLossError
    from flaxlm.preemption import Preempted

    try:
        {"train": _train, "eval": _eval, "generate": _generate}[args.command](args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"flaxlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointSaveError) as e:
        print(f"flaxlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        # 128 + SIGTERM, the status of a process ended by the signal, here after a clean save.
        print(f"flaxlm {args.command}: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"flaxlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
