"""flaxlm and MaxText compile the same model for the same TPU topology ahead of time, side by side.

    JAX_PLATFORMS=cpu python benchmarks/aot_vs_maxtext.py --setup     # once: MaxText's venv
    JAX_PLATFORMS=cpu python benchmarks/aot_vs_maxtext.py \
        --rows llama3-8b/v5p/1 [--rows ...] [--scan both|true|false] [--layers 4] \
        [--sides flaxlm,maxtext] [--venv DIR] [--compiler same|own]

No TPU is needed: libtpu compiles for any topology on this CPU. Each row compiles one train
step in flaxlm and in MaxText (`train_compile`, in its own Python 3.12 virtual environment,
made by `--setup` with MaxText from the package registry) with matched settings: bfloat16
compute, float32 master weights and Adam state, full remat, splash (flash) attention for Llama
and XLA attention with a float32 softmax for GPT-2, FSDP over all chips, the same sequences per
device and length, scanned or unrolled layers.
By default (`--compiler same`) flaxlm's side runs in MaxText's venv too, with PYTHONPATH set to
this tree, so that both programs come from the same jax and libtpu and differ only by the model
code: libtpu releases differ in their scheduling (one extra all-gather per layer on 0.0.42.1,
see benchmarks/RESULTS.md). `--compiler own` compiles flaxlm with this Python's jax and libtpu.

It prints one JSON line per (row, side, scan) and then one table: per-device memory (arguments,
temporaries, peak), whether it fits in HBM, FLOPs and bytes accessed, two step-time estimates and
the collectives by kind (count, GB per device per step). XLA's cost analysis counts a loop body
once, and both programs loop: scanned layers, and on TPU the windowed einsums (a loop over the
shards of a sharded matmul) in every row. FLOPs, bytes and XLA's estimated time (v5p only:
elsewhere libtpu gives none) are corrected on both sides the same way: a scanned row's step is
extrapolated from 1 and 2 unrolled layers (flaxlm: `flaxlm.step_cost`), and every compiled
program gets the loop iterations XLA left out added back, read from its HLO with their trip
counts (`flaxlm.hlo_cost`); `--no-correct` prints XLA's raw figures, marked "loop body once".
The roofline estimate (every generation) is `flaxlm.hlo_cost.program_cost` of the compiled
program itself: each instruction of each iteration at the slower of its matmul FLOPs at the
chip's peak and its HBM bytes at the chip's bandwidth, without overlap or collectives.
Collectives count every iteration (`flaxlm.xla_stats.collective_stats`). Every compile is a
subprocess, so memory is returned between them. A benchmark, not a test: an 8B model compiles
in minutes per row on a small CPU, so `--layers N` compiles both sides at reduced depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "maxtext_aot_driver.py"
DEFAULT_VENV = Path.home() / ".cache" / "flaxlm" / "maxtext-venv"
PYTHON_312 = Path.home() / ".pyenv" / "versions" / "3.12.1" / "bin" / "python"
# jax[tpu] pins the libtpu of its jax (0.11.2: libtpu 0.0.48.1), the versions measured here.
MAXTEXT = ("maxtext[tpu]==0.2.5", "jax[tpu]==0.11.2")
GiB = 1024**3


@dataclass(frozen=True)
class Row:
    """One model on one topology in both libraries (MaxText names v5p slices by cores)."""

    preset: str  # configs/models/<preset>.yaml
    topology: str  # flaxlm's name
    maxtext_topology: str  # MaxText's compile_topology
    chips: int
    per_device: int  # sequences per device
    seq: int
    flaxlm: tuple[str, ...] = ()
    maxtext: tuple[str, ...] = ()
    maxtext_model: str = ""


_LLAMA_FL = ("model.attention=splash",)
_LLAMA_MT = ("model_name=llama3-8b", "attention=flash")
# MaxText has no GPT-2: its gpt3 block (learned positions, LayerNorm with bias, GELU MLP, tied
# embeddings) at GPT-2 XL's sizes. No dropout either side.
_GPT2_FL = ("model.dropout_embed=0", "model.dropout_attn=0", "model.dropout_residual=0")
_GPT2_MT = (
    "model_name=gpt3-6b",
    "base_emb_dim=1600",
    "base_num_query_heads=25",
    "base_num_kv_heads=25",
    "head_dim=64",
    "base_mlp_dim=6400",
    "base_num_decoder_layers=48",
    "vocab_size=50257",
    "trainable_position_size=1024",
    "attention=dot_product",
    # flaxlm's XLA kernel takes the softmax in float32 (as jax.nn.dot_product_attention does);
    # MaxText's dot_product takes it in bfloat16 unless told.
    "float32_logits=true",
)

ROWS = {
    "llama3-8b/v5p/1": Row("llama3-8b", "v5p:2x2x2", "v5p-16", 8, 1, 8192, _LLAMA_FL, _LLAMA_MT),
    "llama3-8b/v5p/4": Row("llama3-8b", "v5p:2x2x2", "v5p-16", 8, 4, 8192, _LLAMA_FL, _LLAMA_MT),
    "llama3-8b/v6e/1": Row("llama3-8b", "v6e:2x4", "v6e-8", 8, 1, 8192, _LLAMA_FL, _LLAMA_MT),
    "gpt2-1.5b/v5e/8": Row("gpt2-1.5b", "v5e:2x2", "v5e-4", 4, 8, 1024, _GPT2_FL, _GPT2_MT),
}


# ---------------------------------------------------------------- MaxText's environment


def setup_venv(venv: Path) -> None:
    """Makes MaxText's Python 3.12 virtual environment (MaxText needs Python >= 3.12)."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([str(PYTHON_312), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--prefer-binary", *MAXTEXT], check=True)


def maxtext_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import maxtext"], capture_output=True)
    if probe.returncode != 0:
        sys.exit(f"MaxText is not installed in {venv}: run with --setup (and --venv {venv})")
    return python


# ---------------------------------------------------------------- one compile per subprocess


def _run_json(cmd: list[str], env: dict[str, str], marker: str) -> dict:
    """Runs cmd; returns the JSON after `marker` on its stdout (its stderr is kept in a log)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith(marker):
                return json.loads(line[len(marker) :])
        log.seek(0)
        tail = "".join(log.readlines()[-30:]) + proc.stdout[-2000:]
    return {"error": f"exit {proc.returncode}: {tail.strip()[-3000:]}"}


def _env(venv_python: bool = False) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if venv_python:
        # Importing this Python's jax pointed these at its own libtpu: the venv's jax must load
        # its own (another libtpu cannot read its Mosaic kernels: "unknown attribute code: 23").
        for name in ("TPU_LIBRARY_PATH", "TPU_HOST_BOUNDS"):
            env.pop(name, None)
    return env


def maxtext_compile(python: Path, row: Row, layers: int, scan: bool, hlo: Path) -> dict:
    args = [
        f"compile_topology={row.maxtext_topology}",
        "compile_topology_num_slices=1",
        *row.maxtext,
        "override_model_config=true",
        f"base_num_decoder_layers={layers}",
        f"per_device_batch_size={row.per_device}",
        f"max_target_length={row.seq}",
        f"scan_layers={str(scan).lower()}",
        "remat_policy=full",
        "dtype=bfloat16",
        "weight_dtype=float32",
        "ici_fsdp_parallelism=-1",
        "enable_checkpointing=false",
        "run_name=aot_vs_maxtext",
        "jax_cache_dir=",  # no persistent cache: a cached program cannot be read back here
        "base_output_directory=" + str(hlo.parent / "maxtext_out"),
    ]
    env = _env(venv_python=True)
    # MaxText's packaged code should not see flaxlm's tree on its path.
    env.pop("PYTHONPATH", None)
    result = _run_json([str(python), str(DRIVER), str(hlo), *args], env, "AOT_RESULT ")
    if "error" in result:
        return result
    m = result["memory"]
    result["memory"] = {
        "arguments": m["argument_size_in_bytes"],
        "outputs": m["output_size_in_bytes"],
        "aliased": m["alias_size_in_bytes"],
        "temporaries": m["temp_size_in_bytes"],
        "peak": m["peak_memory_in_bytes"],
    }
    result["cost"] = {k.replace(" ", "_"): v for k, v in result["cost"].items()}
    return result


def _program(hlo: Path, roofline: tuple[float, float]) -> dict:
    """`flaxlm.hlo_cost.program_cost` of a kept program: every loop by its trip count."""
    from flaxlm import hlo_cost

    return hlo_cost.program_cost(hlo.read_text(), *roofline)


def flaxlm_compile(
    python: Path | None, row: Row, layers: int, scan: bool, hlo: Path, correct: bool
) -> dict:
    """flaxlm's step compiled in a subprocess: this Python, or `python` (MaxText's venv)."""
    spec = {"row": row.__dict__, "layers": layers, "scan": scan, "hlo": str(hlo)}
    spec["correct"] = correct
    env = _env(venv_python=python is not None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [str(python or sys.executable), __file__, "--worker", json.dumps(spec)]
    return _run_json(cmd, env, "AOT_RESULT ")


def flaxlm_worker(spec: dict) -> None:
    """In a subprocess: flaxlm's train step compiled for the row; prints AOT_RESULT json."""
    from importlib import metadata

    from flaxlm import aot, config, step_cost, xla_stats
    from flaxlm.mesh import make_mesh
    from flaxlm.train import Trainer

    row = Row(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["row"].items()})
    overrides = [
        "model.dtype=bfloat16",
        "model.param_dtype=float32",
        "model.remat=full",
        f"model.scan_layers={str(spec['scan']).lower()}",
        f"model.n_layers={spec['layers']}",
        f"data.global_batch_size={row.per_device * row.chips}",
        f"data.seq_len={row.seq}",
        f"model.max_seq_len={row.seq}",
        *row.flaxlm,
    ]
    cfg = config.load(ROOT / "configs" / "models" / f"{row.preset}.yaml", overrides)
    mesh = make_mesh(cfg, aot.topology_devices(row.topology))
    started = time.perf_counter()
    compiled = Trainer(cfg, mesh).compile_step()
    seconds = time.perf_counter() - started
    mem = xla_stats.memory_stats(compiled)
    mem["peak"] = int(getattr(compiled.memory_analysis(), "peak_memory_in_bytes", 0) or 0)
    if spec["correct"]:  # the iterations of the compiler's own loops (windowed einsums)
        cost = step_cost.program_cost(compiled, step_cost.device_roofline(list(mesh.devices.flat)))
    else:
        cost = xla_stats.cost_stats(compiled)
    Path(spec["hlo"]).write_text(compiled.as_text())
    result = {"memory": mem, "cost": cost, "compile_seconds": seconds}
    if spec["correct"] and step_cost.has_loops(cfg):
        result["step_cost"], result["step_cost_how"] = step_cost.step_cost(cfg, mesh)
    pkgs = ("jax", "jaxlib", "libtpu", "flax")
    result["versions"] = {"flaxlm": _git_rev(), **{p: metadata.version(p) for p in pkgs}}
    print("AOT_RESULT " + json.dumps(result), flush=True)


def _git_rev() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True, capture_output=True
    )
    return out.stdout.strip() or "unknown"


# ---------------------------------------------------------------- rows of the table


def _extrapolate(one: dict, two: dict, layers: int) -> dict:
    """Cost at `layers` layers from unrolled compiles at 1 and 2: linear in the depth."""
    return {k: one[k] + (layers - 1) * (two[k] - one[k]) for k in one if k in two}


def measure(side: str, row: Row, layers: int, scan: bool, opts: argparse.Namespace) -> dict:
    """One compile (plus the loop correction's) of one side; a flat record for the table."""
    from flaxlm import step_cost, xla_stats

    tag = f"{side}-{row.preset}-{row.topology}-{row.per_device}-{layers}-{scan}"
    tag = tag.replace(":", "_") + ("-own" if side == "flaxlm" and opts.compiler == "own" else "")
    if opts.logit_chunks > 1:
        tag += f"-chunks{opts.logit_chunks}"
    hlo = opts.workdir / f"{tag}.hlo.txt"
    roofline = opts.roofline[row.topology]
    started = time.perf_counter()
    if side == "flaxlm":
        python = opts.python if opts.compiler == "same" else None
        r = flaxlm_compile(python, row, layers, scan, hlo, opts.correct)
        step, how = r.get("step_cost"), r.get("step_cost_how")
    else:
        r = maxtext_compile(opts.python, row, layers, scan, hlo)
        step, how = None, None
        if "error" not in r and opts.correct:
            r["cost"] = step_cost.with_missed(r["cost"], _program(hlo, roofline))
        if "error" not in r and scan and opts.correct:
            depths = [1, 2] if layers > 2 else [layers]
            files = {n: hlo.with_suffix(f".{n}") for n in depths}
            parts = {n: maxtext_compile(opts.python, row, n, False, f) for n, f in files.items()}
            if all("error" not in p for p in parts.values()):
                costs = [
                    step_cost.with_missed(parts[n]["cost"], _program(files[n], roofline))
                    for n in depths
                ]
                step = costs[0] if len(costs) == 1 else _extrapolate(*costs, layers)
                how = (
                    f"the step unrolled ({layers} layers)"
                    if len(costs) == 1
                    else (f"extrapolated from 1 and 2 unrolled layers to {layers}")
                )
    record = {
        "row": f"{row.preset} {row.topology} {row.per_device}x{row.seq}"
        + (f" chunks={opts.logit_chunks}" if opts.logit_chunks > 1 else ""),
        "side": side,
        "scan": scan,
        "layers": layers,
        "wall_seconds": round(time.perf_counter() - started),
    }
    if "error" in r:
        return {**record, "error": r["error"]}
    m = r["memory"]
    live = m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    peak = m.get("peak") or live
    cost = step if step else r["cost"]
    if not step:
        # Corrected, an unrolled program's loops (windowed einsums, a chunked loss) count by
        # their trip counts.
        loops = "loop body once" if scan or opts.logit_chunks > 1 else "the step unrolled"
        how = "the compiled step, loops by trip counts" if opts.correct and not scan else loops
    seconds = cost.get("optimal_seconds")
    program = _program(hlo, roofline)
    return {
        **record,
        "arguments_gib": round(m["arguments"] / GiB, 2),
        "temporaries_gib": round(m["temporaries"] / GiB, 2),
        "live_gib": round(live / GiB, 2),
        "peak_gib": round(peak / GiB, 2),
        "hbm_gib": opts.hbm[row.topology],
        "fits": peak / GiB <= opts.hbm[row.topology],
        "tflops": round(cost.get("flops", 0) / 1e12, 2),
        "bytes_accessed_gb": round(cost.get("bytes_accessed", 0) / 1e9, 1),
        "xla_seconds": round(seconds, 4) if seconds and seconds > 0 else None,
        "roofline_seconds": round(program["seconds"], 4),
        "matmul_tflops": round(program["flops"] / 1e12, 2),
        "unknown_loops": program["unknown_loops"],
        "cost_is": how,
        "raw_tflops": round(r["cost"].get("flops", 0) / 1e12, 2),
        "collectives": xla_stats.collective_stats(hlo.read_text()),
        "hlo": str(hlo),
        "compile_seconds": round(r["compile_seconds"]),
        "versions": r["versions"],
    }


_KINDS = {
    "all-gather": "AG",
    "all-reduce": "AR",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
}


def table(records: list[dict]) -> str:
    head = (
        "row",
        "side",
        "libtpu",
        "scan",
        "L",
        "args",
        "temp",
        "peak",
        "fits",
        "TFLOP",
        "GB acc",
        "XLA est s",
        "roofline s",
        "collectives n/GB",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "error" in r:
            cells = [
                r["row"],
                r["side"],
                "",
                str(r["scan"]),
                str(r["layers"]),
                "error: " + r["error"].splitlines()[-1][:80],
            ] + [""] * (len(head) - 6)
        else:
            coll = ", ".join(
                f"{_KINDS[k]} {v['count']}/{v['bytes'] / 1e9:.2f}"
                for k, v in sorted(r["collectives"].items())
            )
            flops = f"{r['tflops']}" + ("*" if r["cost_is"] == "loop body once" else "")
            cells = [
                r["row"],
                r["side"],
                r["versions"].get("libtpu", "?"),
                str(r["scan"]),
                str(r["layers"]),
                f"{r['arguments_gib']}",
                f"{r['temporaries_gib']}",
                f"{r['peak_gib']}",
                "yes" if r["fits"] else "NO",
                flops,
                f"{r['bytes_accessed_gb']}",
                f"{r['xla_seconds']}" if r["xla_seconds"] else "n/a",
                f"{r['roofline_seconds']}" if r.get("roofline_seconds") else "n/a",
                coll,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help="make MaxText's venv and exit")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--rows", action="append", choices=sorted(ROWS))
    parser.add_argument("--scan", choices=("both", "true", "false"), default="both")
    parser.add_argument("--layers", type=int, help="both sides at this depth (default: full)")
    parser.add_argument("--sides", default="flaxlm,maxtext")
    parser.add_argument(
        "--compiler",
        choices=("same", "own"),
        default="same",
        help="flaxlm compiles with MaxText's jax and libtpu (same) or this Python's (own)",
    )
    parser.add_argument(
        "--logit-chunks",
        type=int,
        default=1,
        help="both sides compute the loss this many chunks of positions at a time "
        "(flaxlm model.logit_chunks, MaxText num_vocab_tiling)",
    )
    parser.add_argument("--no-correct", dest="correct", action="store_false")
    parser.add_argument("--workdir", type=Path, help="where the HLO texts go (default: a tmp dir)")
    parser.add_argument("--table", type=Path, help="print the table of the JSON lines in a file")
    opts = parser.parse_args()
    if opts.worker:
        return flaxlm_worker(json.loads(opts.worker))
    if opts.table:
        return print(table(_reread(opts.table)))
    if opts.setup:
        return setup_venv(opts.venv)
    sides = opts.sides.split(",")
    if "maxtext" in sides or opts.compiler == "same":
        opts.python = maxtext_python(opts.venv)
    opts.workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="aot_vs_maxtext_"))
    opts.workdir.mkdir(parents=True, exist_ok=True)
    from flaxlm import aot
    from flaxlm.flops import find_chip

    rows = [ROWS[name] for name in opts.rows or sorted(ROWS)]
    if opts.logit_chunks > 1:
        n = opts.logit_chunks
        rows = [
            dataclasses.replace(
                r,
                flaxlm=(*r.flaxlm, f"model.logit_chunks={n}"),
                maxtext=(*r.maxtext, f"num_vocab_tiling={n}"),
            )
            for r in rows
        ]
    chips = {r.topology: find_chip(aot.parse_topology(r.topology)[0]) for r in rows}
    opts.hbm = {topology: chip.hbm_gib for topology, chip in chips.items()}
    opts.roofline = {topology: chip.roofline() for topology, chip in chips.items()}
    scans = {"both": (True, False), "true": (True,), "false": (False,)}[opts.scan]
    records = []
    for row in rows:
        full = _full_depth(row)
        for scan in scans:
            for side in sides:
                record = measure(side, row, opts.layers or full, scan, opts)
                print(json.dumps(record), flush=True)
                records.append(record)
    print(table(records))


def _reread(path: Path) -> list[dict]:
    """Records printed before, with the collectives and the roofline read again from their HLO
    where it is kept."""
    from flaxlm import aot, xla_stats
    from flaxlm.flops import find_chip

    records = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    for r in records:
        if "error" in r or not Path(r.get("hlo", "")).is_file():
            continue
        hlo = Path(r["hlo"])
        r["collectives"] = xla_stats.collective_stats(hlo.read_text())
        roofline = find_chip(aot.parse_topology(r["row"].split()[1])[0]).roofline()
        r["roofline_seconds"] = round(_program(hlo, roofline)["seconds"], 4)
    return records


def _full_depth(row: Row) -> int:
    import yaml

    preset = yaml.safe_load((ROOT / "configs" / "models" / f"{row.preset}.yaml").read_text())
    return int(preset["model"]["n_layers"])


if __name__ == "__main__":
    main()
