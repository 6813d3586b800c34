"""The subcommands of `flaxlm` (the table `COMMANDS`), each handler beside its arguments.

`@command("eval", help, *arguments)` registers a handler; `flaxlm.cli` builds the parser from
the table and maps errors to exit statuses. A handler loads its config (`_config`) before it
imports JAX, TensorFlow or any module that does, so that a bad config fails at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from flaxlm.report import strict_json

if TYPE_CHECKING:
    from flaxlm.config import Config

Argument = Callable[[argparse.ArgumentParser], object]
Handler = Callable[[argparse.Namespace], None]


@dataclasses.dataclass(frozen=True)
class Command:
    names: tuple[str, ...]  # ("train",), or a tool and its action: ("tokenizer", "train")
    help: str
    arguments: tuple[Argument, ...]  # added to the command's parser in order
    run: Handler


COMMANDS: list[Command] = []


def command(names: str, help: str, *arguments: Argument) -> Callable[[Handler], Handler]:
    """Registers the decorated handler as `flaxlm NAMES` with these arguments."""

    def register(run: Handler) -> Handler:
        COMMANDS.append(Command(tuple(names.split()), help, arguments, run))
        return run

    return register


def arg(*flags: str, **kwargs) -> Argument:
    return lambda parser: parser.add_argument(*flags, **kwargs)


def together(*arguments: Argument) -> Argument:
    def add_all(parser: argparse.ArgumentParser) -> None:
        for add in arguments:
            add(parser)

    return add_all


def overrides(help: str = "key.sub=value overrides") -> Argument:
    return arg("overrides", nargs="*", help=help)


def config_file(help: str = "YAML config file", then: str = "key.sub=value overrides") -> Argument:
    """`--config FILE` (repeatable: later files override earlier ones) and the `key.sub=value`
    overrides after it, as `_config` reads them."""
    return together(
        arg("--config", required=True, action="append", help=f"{help}; repeat to compose"),
        overrides(then),
    )


checkpoint = together(
    arg("--checkpoint", required=True, help="run directory"),
    arg("--step", type=int, default=None, help="checkpoint step (default: latest)"),
)
timing = together(
    arg("--steps", type=int, default=10, help="timed steps (default 10)"),
    arg("--warmup", type=int, default=2, help="untimed steps after compiling"),
)


def _config(args: argparse.Namespace, join: bool = False) -> Config:
    """The validated config of `--config` and the overrides, loaded before any heavy import;
    with `join`, then joins the other processes of a multi-host job (before device work)."""
    from flaxlm import config

    cfg = config.load_files(args.config, args.overrides)
    if join:
        from flaxlm import distributed

        distributed.initialize(cfg.distributed)
    return cfg


def _one_config(args: argparse.Namespace) -> str:
    """The one --config of a command that reads its file itself (a ladder, a sweep base)."""
    from flaxlm.config import ConfigError

    if len(args.config) > 1:
        raise ConfigError(
            f"flaxlm {args.command} takes one --config, got {len(args.config)}: "
            f"{', '.join(args.config)}; merge them with `defaults: [...]` in one file"
        )
    return args.config[0]


def _is_first_process() -> bool:
    import jax

    return jax.process_index() == 0


def _result(text: str) -> None:
    """Prints a result on stdout, once per job: from its first process."""
    if _is_first_process():
        print(text, flush=True)


@command("train", "train a model (resumes if run_dir has checkpoints)", config_file())
def cmd_train(args: argparse.Namespace) -> None:
    cfg = _config(args, join=True)
    from flaxlm.loop import run

    s = run(cfg)
    if not _is_first_process():  # every process trains; one prints the result
        return
    if s.start_step == s.end_step and s.wall_seconds == 0.0:
        print(f"already complete at step {s.end_step}; nothing trained", flush=True)
        return
    lines = [f"trained steps {s.start_step}..{s.end_step} in {s.wall_seconds:.0f} s"]
    if s.tokens_per_second:
        lines.append(
            f"throughput: {s.tokens_per_second:,.0f} tokens/s (median step, compilation excluded)"
        )
    if s.skipped_steps or s.loss_spikes:
        lines.append(f"skipped steps: {s.skipped_steps}; loss spikes: {s.loss_spikes}")
    if s.first_eval is not None:
        lines.append(f"bits per byte: {s.first_eval['bits_per_byte']:.3f} at the start")
    lines.append(f"bits per byte: {s.final_eval['bits_per_byte']:.3f} at the end")
    if "mlm_accuracy" in s.final_eval:  # an encoder: how many masked tokens it gets right
        start = f"{s.first_eval['mlm_accuracy']:.3f} at the start, " if s.first_eval else ""
        lines.append(f"masked-token accuracy: {start}{s.final_eval['mlm_accuracy']:.3f} at the end")
    if s.sample is not None:
        lines.append("sample:\n" + s.sample)
    print("\n".join(lines), flush=True)


@command(
    "eval",
    "evaluate a checkpoint: loss, perplexity, bits per byte",
    checkpoint,
    arg(
        "--all-steps",
        action="store_true",
        help="evaluate every checkpoint; also write RUN_DIR/eval/table.csv and eval_loss.png",
    ),
    overrides("key.sub=value overrides (data.*, mesh.*)"),
)
def cmd_eval(args: argparse.Namespace) -> None:
    from flaxlm.evaluate import evaluate_all_steps, evaluate_run

    # Every process of a multi-host job evaluates its share; the first prints.
    if args.all_steps:
        for result in evaluate_all_steps(args.checkpoint, args.overrides):
            _result(strict_json(result))
    else:
        _result(strict_json(evaluate_run(args.checkpoint, args.step, args.overrides)))


@command(
    "generate",
    "continue a prompt with a trained model",
    checkpoint,
    arg("--prompt", required=True, action="append", help="repeat for a batch"),
    arg(
        "--max-new-tokens",
        type=int,
        default=None,
        help="new tokens at most (default: 100, or what the context leaves)",
    ),
    arg("--temperature", type=float, default=0.0, help="0 is greedy"),
    arg("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)"),
    arg("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)"),
    arg("--stop", action="append", default=[], help="stop after this string"),
    arg("--seed", type=int, default=0),
)
def cmd_generate(args: argparse.Namespace) -> None:
    from flaxlm.config import ConfigError

    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature and --top-k must be >= 0 and --top-p in (0, 1]")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    from flaxlm.generate import SamplingConfig, check_room, generate_text
    from flaxlm.run_dir import load_run, load_tokenizer

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    tokenizer = load_tokenizer(args.checkpoint)
    _, trainer, params, _ = load_run(args.checkpoint, args.step, [])
    new_tokens = check_room(trainer, args.prompt, args.max_new_tokens, tokenizer)
    texts = generate_text(
        trainer, params, args.prompt, new_tokens, sampling, tuple(args.stop), tokenizer
    )
    _result("\n\n".join(texts))


@command(
    "fill-mask",
    "predict the tokens at each [MASK] of a text with an encoder (BERT)",
    checkpoint,
    arg("--text", required=True, help='text with one or more [MASK], e.g. "The [MASK] sat."'),
    arg("--top-k", type=int, default=5, help="predictions per mask (default 5)"),
)
def cmd_fill_mask(args: argparse.Namespace) -> None:
    from flaxlm.fill_mask import fill_mask
    from flaxlm.run_dir import load_run, load_tokenizer

    tokenizer = load_tokenizer(args.checkpoint)
    _, trainer, params, _ = load_run(args.checkpoint, args.step, [])
    for result in fill_mask(trainer, params, args.text, tokenizer, args.top_k):
        _result(strict_json(result))  # one JSON object per [MASK], in order


@command(
    "compile",
    "compile the train step for a TPU topology ahead of time: memory, FLOPs",
    config_file(),
    arg("--topology", required=True, help="TPU slice, e.g. v5p:4x4x4 or v5e:16x16"),
    arg("--slices", type=int, default=1, help="slices joined over DCN (multislice)"),
)
def cmd_compile(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from flaxlm import aot

    print(f"compiling for {args.slices} x {args.topology} ...", file=sys.stderr, flush=True)
    print(strict_json(aot.compile_report(cfg, args.topology, args.slices)), flush=True)


@command(
    "export",
    "write a checkpoint's parameters alone, for evaluation",
    checkpoint,
    arg("dst", help="a new directory"),
)
def cmd_export(args: argparse.Namespace) -> None:
    from flaxlm.run_dir import export_params

    step = export_params(args.checkpoint, args.dst, args.step)
    print(f"wrote {args.dst}: parameters and tokenizer of step {step}")


@command(
    "convert",
    "import or export Hugging Face GPT-2 / Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Mixtral / "
    "BERT models",
    arg("direction", choices=["from-hf", "to-hf"]),
    arg("src", help="from-hf: a Hugging Face model directory; to-hf: a run directory"),
    arg("dst", help="from-hf: a new run directory; to-hf: a new model directory"),
    arg("--step", type=int, default=None, help="to-hf: checkpoint step"),
    arg("--dtype", default=None, help="to-hf: float32, bfloat16, ... (default: the params')"),
    arg("--max-shard-size", type=int, default=5 * 2**30, help="to-hf: bytes per file at most"),
    overrides("key.sub=value: from-hf, for the run config; to-hf, e.g. distributed.*"),
)
def cmd_convert(args: argparse.Namespace) -> None:
    from flaxlm import convert

    if args.direction == "from-hf":
        cfg = convert.from_hf(args.src, args.dst, args.overrides)
        print(f"wrote {args.dst}: {convert.family(cfg.model)} model, checkpoint at step 0")
    else:
        step, files = convert.to_hf(
            args.src, args.dst, args.step, args.dtype, args.max_shard_size, args.overrides
        )
        written = ", ".join(files)
        _result(f"wrote {args.dst}: config.json, {written} and the tokenizer of step {step}")


@command("bench", "time the train step: tokens/s, MFU, memory (JSON)", config_file(), timing)
def cmd_bench(args: argparse.Namespace) -> None:
    cfg = _config(args, join=True)
    from flaxlm.bench import bench

    record = bench(cfg, args.steps, args.warmup)
    _result(strict_json(record))  # every process of a multi-host job times the same steps


@command(
    "sweep",
    "bench over mesh shapes or model sizes: CSV, JSON, PNG",
    arg("kind", choices=["mesh", "models"]),
    config_file(),
    arg("--meshes", nargs="+", default=[], help="mesh: DATAxFSDPxTENSOR shapes"),
    arg("--models", nargs="+", default=[], help="models: model preset YAML files"),
    arg(
        "--per-device-batch",
        type=int,
        default=None,
        help="mesh: global batch = this x data x fsdp (weak scaling; default: the config's batch)",
    ),
    arg("--out", default="runs/sweep", help="directory for KIND.csv/.json/.png"),
    timing,
)
def cmd_sweep(args: argparse.Namespace) -> None:
    from flaxlm.config import ConfigError

    cfg = _config(args)
    if args.kind == "mesh" and not args.meshes:
        raise ConfigError("flaxlm sweep mesh needs --meshes, for example 1x1x1 8x1x1 2x2x2")
    if args.kind == "models" and not args.models:
        raise ConfigError("flaxlm sweep models needs --models, a list of model preset files")
    from flaxlm import distributed, sweep

    distributed.initialize(cfg.distributed)
    if args.kind == "mesh":
        points = sweep.mesh_sweep(cfg, args.meshes, args.steps, args.warmup, args.per_device_batch)
    else:
        points = sweep.model_sweep(
            _one_config(args), args.models, args.overrides, args.steps, args.warmup
        )
    _stream(points, lambda records: sweep.write_sweep(records, Path(args.out), args.kind))


@command(
    "scaling",
    "train a ladder of models, fit loss against compute",
    config_file("ladder YAML (configs/scaling/)", then="key.sub=value overrides for every run"),
    arg("--out", default="runs/scaling", help="directory for the results"),
    arg(
        "--separate-runs",
        action="store_true",
        help="one run per (model, budget), each with its own schedule (overrides shared_runs)",
    ),
)
def cmd_scaling(args: argparse.Namespace) -> None:
    from flaxlm import scaling

    ladder, experiment = scaling.load_ladder(_one_config(args))
    if args.separate_runs:
        ladder = dataclasses.replace(ladder, shared_runs=False)
    runs, skipped = scaling.plan(ladder, experiment, args.overrides)
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)

    def write(records: list[dict]) -> list:
        fit, paths = scaling.write_results(records, Path(args.out))
        print(strict_json({"fit": fit}), flush=True)
        return paths

    _stream(scaling.run_ladder(runs), write)


@command(
    "goodput",
    "where a run's wall time went, across its restarts (also writes RUN_DIR/goodput.png)",
    arg("run_dir", help="run directory"),
)
def cmd_goodput(args: argparse.Namespace) -> None:
    from flaxlm import goodput

    record = goodput.load(args.run_dir)
    if record is None:
        raise FileNotFoundError(f"{Path(args.run_dir) / goodput.FILE} does not exist; train first")
    print(json.dumps(record), flush=True)
    print("\n".join(goodput.summary_lines(record)), file=sys.stderr)
    path = goodput.plot(record, Path(args.run_dir) / "goodput.png")
    print(f"wrote {path}", file=sys.stderr)


def _stream(points: Iterable[dict], write: Callable[[list[dict]], list]) -> None:
    """Prints one JSON line per record as it finishes, then writes them all (first process)."""
    first = _is_first_process()
    records = []
    for record in points:
        if first:
            print(strict_json(record), flush=True)
        records.append(record)
    if first:
        paths = write(records)
        print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
