"""The `flaxlm` command line: train, eval, generate, convert.

    flaxlm train    --config configs/X.yaml [key.sub=value ...]
    flaxlm eval     --checkpoint RUN_DIR [--step N | --all-steps] [key.sub=value ...]
    flaxlm generate --checkpoint RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                    [--seed S]
    flaxlm compile  --config configs/X.yaml --topology v5p:4x4x4 [--slices N] [key.sub=value ...]
    flaxlm export   --checkpoint RUN_DIR [--step N] DST
    flaxlm convert  {from-hf|to-hf} SRC DST
    flaxlm tokenizer train --config C --vocab-size N --output DIR [key.sub=value ...]
    flaxlm data build-tfds --train-files GLOB [--eval-files GLOB] --data-dir DIR
    flaxlm bench    --config configs/X.yaml [--steps N] [--warmup N] [key.sub=value ...]
    flaxlm sweep    mesh --config C --meshes 1x1x1 8x1x1 ... [--out DIR] [key.sub=value ...]
    flaxlm sweep    models --config C --models PRESET.yaml ... [--out DIR] [key.sub=value ...]
    flaxlm scaling  --config LADDER.yaml [--out DIR] [--separate-runs] [key.sub=value ...]

Results go to stdout (`eval` prints one JSON object per line, `generate` the text); progress and
errors go to stderr. Exit status: 0 on success; 2 on a bad input and 1 on a failed run (NaN loss,
failed save), each with a one-paragraph message; 143 when SIGTERM stopped training after a save.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flaxlm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (resumes if run_dir has checkpoints)")
    train.add_argument("--config", required=True, help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    ev = sub.add_parser("eval", help="evaluate a checkpoint: loss, perplexity, bits per byte")
    ev.add_argument("--checkpoint", required=True, help="run directory")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ev.add_argument(
        "--all-steps",
        action="store_true",
        help="evaluate every checkpoint; also write RUN_DIR/eval/table.csv and eval_loss.png",
    )
    ev.add_argument("overrides", nargs="*", help="key.sub=value overrides (data.*, mesh.*)")

    gen = sub.add_parser("generate", help="continue a prompt with a trained model")
    gen.add_argument("--checkpoint", required=True, help="run directory")
    gen.add_argument("--step", type=int, default=None)
    gen.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    gen.add_argument("--stop", action="append", default=[], help="stop after this string")
    gen.add_argument("--seed", type=int, default=0)
    comp = sub.add_parser(
        "compile", help="compile the train step for a TPU topology ahead of time: memory, FLOPs"
    )
    comp.add_argument("--config", required=True, help="YAML config file")
    comp.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:4x4x4 or v5e:16x16")
    comp.add_argument("--slices", type=int, default=1, help="slices joined over DCN (multislice)")
    comp.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    exp = sub.add_parser("export", help="write a checkpoint's parameters alone, for evaluation")
    exp.add_argument("--checkpoint", required=True, help="run directory")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument("dst", help="a new directory")

    conv = sub.add_parser("convert", help="import or export Hugging Face GPT-2 / Llama models")
    conv.add_argument("direction", choices=["from-hf", "to-hf"])
    conv.add_argument("src", help="from-hf: a Hugging Face model directory; to-hf: a run directory")
    conv.add_argument("dst", help="from-hf: a new run directory; to-hf: a new model directory")
    conv.add_argument("--step", type=int, default=None, help="to-hf: checkpoint step")
    conv.add_argument("overrides", nargs="*", help="from-hf: key.sub=value for the run config")

    tokenizer = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tokenizer.add_subparsers(dest="action", required=True)
    tok = tok_sub.add_parser("train", help="train a SentencePiece model on a config's data")
    tok.add_argument("--config", required=True, help="YAML config file (its data.* is read)")
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--output", required=True, help="directory for sentencepiece.model")
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    tok.add_argument("--max-bytes", type=int, default=200_000_000, help="text to read at most")
    tok.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    data_cmd = sub.add_parser("data", help="data tools")
    data_sub = data_cmd.add_subparsers(dest="action", required=True)
    data = data_sub.add_parser("build-tfds", help="prepare local text as a versioned TFDS dataset")
    data.add_argument("--train-files", required=True, help="glob of .txt/.jsonl/.tfrecord")
    data.add_argument("--eval-files", default=None, help="glob for the validation split")
    data.add_argument("--data-dir", required=True, help="TFDS data directory")
    data.add_argument("--text-field", default="text")
    _add_bench_parsers(sub)
    return parser


def _tokenizer(args: argparse.Namespace) -> None:
    from flaxlm import config as config_lib
    from flaxlm.data.train_tokenizer import train_sentencepiece

    cfg = config_lib.load(args.config, args.overrides)
    path = train_sentencepiece(
        cfg.data, args.vocab_size, args.output, args.model_type, args.max_bytes
    )
    print(f"wrote {path}; train with data.tokenizer=sentencepiece data.tokenizer_path={path}")


def _data(args: argparse.Namespace) -> None:
    from flaxlm.data.tfds_builder import build

    path = build(args.train_files, args.data_dir, args.eval_files, args.text_field)
    print(
        f"wrote {path}; train with data.corpus=tfds data.tfds_name=flaxlm_text "
        f"data.tfds_data_dir={args.data_dir}"
    )


def _add_bench_parsers(sub) -> None:
    """`bench`, `sweep` and `scaling`: throughput, scaling over meshes and sizes, scaling laws."""

    def timing(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
        p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")

    bench = sub.add_parser("bench", help="time the train step: tokens/s, MFU, memory (JSON)")
    bench.add_argument("--config", required=True, help="YAML config file")
    timing(bench)
    bench.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    sweep = sub.add_parser("sweep", help="bench over mesh shapes or model sizes: CSV, JSON, PNG")
    sweep.add_argument("kind", choices=["mesh", "models"])
    sweep.add_argument("--config", required=True, help="YAML config file")
    sweep.add_argument("--meshes", nargs="+", default=[], help="mesh: DATAxFSDPxTENSOR shapes")
    sweep.add_argument("--models", nargs="+", default=[], help="models: model preset YAML files")
    sweep.add_argument(
        "--per-device-batch",
        type=int,
        default=None,
        help="mesh: global batch = this x data x fsdp (weak scaling; default: the config's batch)",
    )
    sweep.add_argument("--out", default="runs/sweep", help="directory for KIND.csv/.json/.png")
    timing(sweep)
    sweep.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    scaling = sub.add_parser("scaling", help="train a ladder of models, fit loss against compute")
    scaling.add_argument("--config", required=True, help="ladder YAML (configs/scaling/)")
    scaling.add_argument("--out", default="runs/scaling", help="directory for the results")
    scaling.add_argument(
        "--separate-runs",
        action="store_true",
        help="one run per (model, budget), each with its own schedule (overrides shared_runs)",
    )
    scaling.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run")


def _bench(args: argparse.Namespace) -> None:
    from flaxlm import config as config_lib
    from flaxlm.bench import bench

    cfg = config_lib.load(args.config, args.overrides)
    _join(cfg)
    record = bench(cfg, args.steps, args.warmup)
    if _is_first_process():  # every process of a multi-host job times the same steps
        print(json.dumps(record), flush=True)


def _join(cfg) -> None:
    """Joins the other processes of a multi-host job (before any device work)."""
    from flaxlm import distributed

    distributed.initialize(cfg.distributed)


def _is_first_process() -> bool:
    import jax

    return jax.process_index() == 0


def _sweep(args: argparse.Namespace) -> None:
    from pathlib import Path

    from flaxlm import config as config_lib
    from flaxlm import sweep
    from flaxlm.config import ConfigError

    _join(config_lib.load(args.config, args.overrides))
    if args.kind == "mesh":
        if not args.meshes:
            raise ConfigError("flaxlm sweep mesh needs --meshes, for example 1x1x1 8x1x1 2x2x2")
        cfg = config_lib.load(args.config, args.overrides)
        points = sweep.mesh_sweep(cfg, args.meshes, args.steps, args.warmup, args.per_device_batch)
    else:
        if not args.models:
            raise ConfigError("flaxlm sweep models needs --models, a list of model preset files")
        points = sweep.model_sweep(
            args.config, args.models, args.overrides, args.steps, args.warmup
        )
    first = _is_first_process()
    records = []
    for record in points:  # one JSON line per point as it finishes
        if first:
            print(json.dumps(record), flush=True)
        records.append(record)
    if first:
        paths = sweep.write_sweep(records, Path(args.out), args.kind)
        print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)


def _scaling(args: argparse.Namespace) -> None:
    import dataclasses
    from pathlib import Path

    from flaxlm import scaling

    ladder, experiment = scaling.load_ladder(args.config)
    if args.separate_runs:
        ladder = dataclasses.replace(ladder, shared_runs=False)
    runs, skipped = scaling.plan(ladder, experiment, args.overrides)
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    first = _is_first_process()
    records = []
    for record in scaling.run_ladder(runs):
        if first:
            print(json.dumps(record), flush=True)
        records.append(record)
    if first:
        fit, paths = scaling.write_results(records, Path(args.out))
        print(json.dumps({"fit": fit}), flush=True)
        print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)


def _export(args: argparse.Namespace) -> None:
    from flaxlm.run_dir import export_params

    step = export_params(args.checkpoint, args.dst, args.step)
    print(f"wrote {args.dst}: parameters of step {step}")


def _convert(args: argparse.Namespace) -> None:
    from flaxlm import convert

    if args.direction == "from-hf":
        cfg = convert.from_hf(args.src, args.dst, args.overrides)
        print(f"wrote {args.dst}: {convert.family(cfg.model)} model, checkpoint at step 0")
    else:
        convert.to_hf(args.src, args.dst, args.step)
        print(f"wrote {args.dst}: config.json and model.safetensors")


def _train(args: argparse.Namespace) -> None:
    from flaxlm import config as config_lib
    from flaxlm.loop import run

    cfg = config_lib.load(args.config, args.overrides)
    _join(cfg)
    s = run(cfg)
    lines = [f"trained steps {s.start_step}..{s.end_step} in {s.wall_seconds:.0f} s"]
    if s.tokens_per_second:
        lines.append(f"throughput: {s.tokens_per_second:,.0f} tokens/s (median step)")
    if s.skipped_steps or s.loss_spikes:
        lines.append(f"skipped steps: {s.skipped_steps}; loss spikes: {s.loss_spikes}")
    if s.first_eval is not None:
        lines.append(f"bits per byte: {s.first_eval['bits_per_byte']:.3f} at the start")
    lines.append(f"bits per byte: {s.final_eval['bits_per_byte']:.3f} at the end")
    if s.sample is not None:
        lines.append("sample:\n" + s.sample)
    print("\n".join(lines), flush=True)


def _compile(args: argparse.Namespace) -> None:
    from flaxlm import aot
    from flaxlm import config as config_lib

    cfg = config_lib.load(args.config, args.overrides)
    print(f"compiling for {args.slices} x {args.topology} ...", file=sys.stderr, flush=True)
    print(json.dumps(aot.compile_report(cfg, args.topology, args.slices)), flush=True)


def _eval(args: argparse.Namespace) -> None:
    from flaxlm.evaluate import evaluate_all_steps, evaluate_run

    if args.all_steps:
        for result in evaluate_all_steps(args.checkpoint, args.overrides):
            print(json.dumps(result), flush=True)
    else:
        print(json.dumps(evaluate_run(args.checkpoint, args.step, args.overrides)), flush=True)


def _generate(args: argparse.Namespace) -> None:
    from flaxlm.config import ConfigError
    from flaxlm.generate import SamplingConfig
    from flaxlm.loop import generate_text
    from flaxlm.run_dir import load_run, load_tokenizer

    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature and --top-k must be >= 0 and --top-p in (0, 1]")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    _, trainer, params, _ = load_run(args.checkpoint, args.step, [])
    tokenizer = load_tokenizer(args.checkpoint)
    texts = generate_text(
        trainer, params, args.prompt, args.max_new_tokens, sampling, tuple(args.stop), tokenizer
    )
    print("\n\n".join(texts), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from flaxlm.checkpoint import CheckpointSaveError
    from flaxlm.config import ConfigError
    from flaxlm.preemption import Preempted
    from flaxlm.run_state import NonFiniteLossError

    try:
        commands = {
            "train": _train,
            "eval": _eval,
            "generate": _generate,
            "export": _export,
            "compile": _compile,
            "convert": _convert,
            "tokenizer": _tokenizer,
            "data": _data,
            "bench": _bench,
            "sweep": _sweep,
            "scaling": _scaling,
        }
        commands[args.command](args)
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
