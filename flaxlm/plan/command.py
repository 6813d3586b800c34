"""The `flaxlm plan` subcommand (registered in `flaxlm.commands`' table when `flaxlm.cli`
imports this module; JAX loads only inside the handler).

    flaxlm plan --config C [--topology v5p:4x4x4] [--slices N] [--global-batch B] [--top K]
                [--compile N] [--jobs J] [--scan {config,both}] [--remat R ...]
                [--cache DIR] [--out DIR] [--apply OUT.yaml] [--hbm-gib G] [key.sub=value ...]

Results: one JSON line per compiled candidate on stdout, best first; the table and the ready
command on stderr; plan.md, plan.jsonl and plan.png in --out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flaxlm.commands import _config, arg, command, config_file


@command(
    "plan",
    "choose the mesh, remat and batch split that fit and run fastest, by compiling",
    config_file(),
    arg("--topology", default=None, help="TPU slice, e.g. v5p:4x4x4 (default: devices here)"),
    arg("--slices", type=int, default=1, help="slices joined over DCN (multislice)"),
    arg("--global-batch", type=int, default=None, help="rows per step (default: the config's)"),
    arg("--top", type=int, default=10, help="rows of the table printed (default 10)"),
    arg("--compile", type=int, default=8, help="candidates compiled, best by the analytic model"),
    arg("--jobs", type=int, default=1, help="compiling processes at once (memory permitting)"),
    arg("--scan", choices=["config", "both"], default="config", help="scanned layers or both"),
    arg("--remat", nargs="+", default=None, help="remat policies tried (default: all)"),
    arg("--hbm-gib", type=float, default=None, help="memory per device (default: the chip's)"),
    arg("--cache", default="~/.cache/flaxlm/plan", help="compiled programs; 'none' to disable"),
    arg("--out", default="runs/plan", help="directory for plan.md, plan.jsonl, plan.png"),
    arg("--apply", default=None, metavar="OUT.yaml", help="write the chosen config here"),
)
def cmd_plan(args: argparse.Namespace) -> None:
    from flaxlm.config import ConfigError, Remat

    if args.global_batch is not None:
        args.overrides = [*args.overrides, f"data.global_batch_size={args.global_batch}"]
    cfg = _config(args)
    if args.compile < 1 or args.jobs < 1 or args.top < 1:
        raise ConfigError("--compile, --jobs and --top must be at least 1")
    try:
        remats = tuple(Remat(r) for r in args.remat) if args.remat else tuple(Remat)
    except ValueError:
        raise ConfigError(f"--remat takes {[str(r) for r in Remat]}, got {args.remat}") from None
    import dataclasses

    from flaxlm.plan import output, planner

    def say(message: str) -> None:
        print(f"flaxlm plan: {message}", file=sys.stderr, flush=True)

    target = planner.make_target(args.topology, args.slices, args.hbm_gib)
    space = dataclasses.replace(planner.default_space(cfg, target, args.scan), remats=remats)
    cache = None if args.cache == "none" else Path(os.path.expanduser(args.cache))
    say(f"planning {target.describe()}")
    result = planner.plan(cfg, target, space, args.compile, args.jobs, cache, say)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = output.json_lines(result)
    (out / "plan.jsonl").write_text("".join(f"{line}\n" for line in lines))
    (out / "plan.md").write_text(output.table(result) + "\n")
    output.plot(result, out / "plan.png")
    for line in lines:
        print(line, flush=True)
    print(output.table(result, args.top), file=sys.stderr)
    print("\n" + output.commands(result, args.config, args.overrides), file=sys.stderr)
    if args.apply:
        say(f"wrote {output.apply(result, cfg, Path(args.apply))}")
    say(f"wrote {out}/plan.md, plan.jsonl, plan.png")
