"""flaxlm's train step against PyTorch + transformers on the same model, in one run.

    python benchmarks/vs_pytorch.py [--steps 20 --warmup 3 --repeats 3] [--bf16]
    python benchmarks/vs_pytorch.py --devices 8     # scaling: 1 device vs data=8 vs fsdp=8

The model is `configs/bench/gpt2-23m.yaml` (GPT-2, 23,240,704 parameters, 2,048 tokens per step),
built on both sides from random weights: flaxlm's `Trainer` step (jit, donated state) and a
`transformers.GPT2LMHeadModel` with `torch.optim.AdamW` (same decay mask: matrices and
embeddings), eager and under `torch.compile`. Each timed step feeds a fresh batch and reads the
loss back to the host, as a training loop does.

The machine is shared and noisy, so the variants are interleaved: repeat r runs warm-up + steps
of every variant in turn, and each variant's figure is the median over all its timed steps. The
float32 matmul peak (a 1024 x 1024 jitted matmul, same threads) is measured between rounds and
its best is kept; a run of such matmuls worth one step's FLOPs is also timed as if it were a
variant, interleaved with the steps: the step's share of *that* rate is the figure to trust on a
shared machine. Prints a table and, last, one JSON line.

`--bf16` adds flaxlm with bfloat16 compute (float32 master weights) and PyTorch under
`torch.autocast(bfloat16)`, and compares flaxlm's first `--curve-steps` losses in bfloat16 with
float32's on the same batches.

`--devices N` forces N host devices (before JAX starts) and measures flaxlm alone on 1 device and
on N devices as data=N and fsdp=N: tokens/s per device relative to 1 device, and the per-device
memory of the compiled step (arguments + temporaries, from XLA's memory analysis). The devices
share the host's cores, so this measures the overhead of partitioning, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "bench" / "gpt2-23m.yaml"
EXPECTED_PARAMS = 23_240_704


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant and repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the variants")
    p.add_argument("--bf16", action="store_true", help="add the bfloat16 rows and loss curves")
    p.add_argument("--curve-steps", type=int, default=50, help="steps of the bf16 loss curves")
    p.add_argument("--devices", type=int, default=0, help="scaling mode on N forced devices")
    p.add_argument("--no-torch", action="store_true", help="flaxlm only (no PyTorch rows)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="flaxlm config overrides"
    )
    return p.parse_args()


ARGS = parse_args()
if ARGS.devices:
    # Must precede the first import of jax.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(REPO))
from flaxlm import config as config_lib  # noqa: E402
from flaxlm import xla_stats  # noqa: E402
from flaxlm.flops import (  # noqa: E402
    analytic_param_count,
    best_matmul_flops,
    flops_per_step,
    flops_per_token,
    param_count,
    square_matmul,
)
from flaxlm.mesh import make_mesh  # noqa: E402
from flaxlm.train import Trainer  # noqa: E402

Step = Callable[[dict[str, np.ndarray]], float]  # one train step on a batch; returns the loss


def load_cfg(*overrides: str) -> config_lib.Config:
    return config_lib.load(CONFIG, [*ARGS.set, *overrides])


def make_batches(cfg: config_lib.Config, count: int, seed: int = 0) -> list[np.ndarray]:
    """Token rows drawn from a Zipf-like unigram law, so that the loss has something to learn."""
    rng = np.random.default_rng(seed)
    v = cfg.model.vocab_size
    probs = 1.0 / np.arange(1, v + 1)
    probs /= probs.sum()
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    return [rng.choice(v, size=shape, p=probs).astype(np.int32) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# flaxlm


class FlaxStep:
    """flaxlm's Trainer on a mesh: state created on the devices, the jitted step timed as is."""

    def __init__(self, cfg: config_lib.Config, devices: list | None = None):
        self.cfg = cfg
        self.trainer = Trainer(cfg, make_mesh(cfg, devices))
        self.state = self.trainer.init_state(cfg.train.seed)
        self.n_params = param_count(self.state.params)
        # Each step brings its own tokens; positions and segments stay those of the synthetic
        # batch (one document per row).
        self.fixed = self.trainer.synthetic_batch()

    def __call__(self, tokens: np.ndarray) -> float:
        batch = self.trainer.global_batch({**self.fixed, "tokens": tokens})
        self.state, metrics = self.trainer.step(self.state, batch)
        return float(metrics["loss"])

    def memory_per_device(self) -> dict[str, float]:
        """MiB per device of the compiled step: arguments (state, batch) and temporaries."""
        m = xla_stats.memory_stats(self.trainer.compile_step())
        mib = 1 / 2**20
        return {
            "arguments_mib": m["arguments"] * mib,
            "temporaries_mib": m["temporaries"] * mib,
            "total_mib": (m["arguments"] + m["temporaries"]) * mib,
        }


# ---------------------------------------------------------------------------------------------
# PyTorch + transformers


def torch_model(cfg: config_lib.Config):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    hf = GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.max_seq_len,
        n_embd=m.d_model,
        n_layer=m.n_layers,
        n_head=m.n_heads,
        n_inner=m.d_ff,
        activation_function="gelu_new",  # the tanh approximation, as flaxlm's GPT-2 MLP
        layer_norm_epsilon=m.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        use_cache=False,
    )
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPT2LMHeadModel(hf).train()


class TorchStep:
    """GPT2LMHeadModel + AdamW with flaxlm's hyper-parameters and decay mask."""

    def __init__(self, cfg: config_lib.Config, compile_model: bool, bf16: bool):
        import torch

        self.torch = torch
        self.model = torch_model(cfg)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        o = cfg.optimizer
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay}],
            lr=o.learning_rate,
            betas=(o.b1, o.b2),
            eps=o.eps,
            weight_decay=0.0,
        )
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.bf16 = bf16

    def __call__(self, tokens: np.ndarray) -> float:
        torch = self.torch
        ids = torch.from_numpy(tokens).long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.forward(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ---------------------------------------------------------------------------------------------
# Measurement


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 n x n matmul in this process (best of `repeats`), measured
    afresh at each call."""
    return best_matmul_flops(n, repeats)


class MatmulStep:
    """Dense float32 n x n matmuls worth one train step's FLOPs, timed like a step.

    Interleaved with the steps, it measures the matmul rate the machine gives *under the same
    conditions*: on a shared machine a best-of-few peak catches a quiet moment that the much
    longer steps never see, which understates the step's share of the peak.
    """

    def __init__(self, step_flops: float, n: int = 1024):
        self.a, self.matmul = square_matmul(n)
        self.count = max(1, round(step_flops / (2.0 * n**3)))
        self.flops = self.count * 2.0 * n**3

    def __call__(self, tokens: np.ndarray) -> float:
        out = [self.matmul(self.a, self.a) for _ in range(self.count)]
        jax.block_until_ready(out)
        return 0.0


def run_interleaved(
    variants: dict[str, Step | str], batches: list[np.ndarray], peaks: list[float]
) -> dict[str, list[float]]:
    """Per-step seconds of each variant, rounds interleaved; a str variant is an error message."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(ARGS.repeats):
        for name, step in variants.items():
            if isinstance(step, str):
                continue
            for i in range(ARGS.warmup):
                step(batches[i % len(batches)])
            for i in range(ARGS.steps):
                t = time.perf_counter()
                loss = step(batches[(ARGS.warmup + i) % len(batches)])
                times[name].append(time.perf_counter() - t)
            print(
                f"  round {r + 1}/{ARGS.repeats} {name}: median "
                f"{statistics.median(times[name][-ARGS.steps :]) * 1e3:.1f} ms/step, "
                f"loss {loss:.3f}",
                file=sys.stderr,
                flush=True,
            )
        peaks.append(matmul_peak())
    return times


def try_build(name: str, build: Callable[[], Step]) -> Step | str:
    try:
        step = build()
        return step
    except Exception as e:  # a missing compiler must show in the table, not end the run
        message = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  {name} unavailable: {message}", file=sys.stderr)
        return message


def check_compiles(name: str, step: Step | str, batch: np.ndarray) -> Step | str:
    """Runs one step so that a failing torch.compile is reported as such."""
    if isinstance(step, str):
        return step
    try:
        step(batch)
        return step
    except Exception as e:
        message = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  {name} failed: {message}", file=sys.stderr)
        return message


def bf16_curves(cfg32: config_lib.Config, steps: int) -> dict[str, list[float]]:
    """flaxlm's losses over the same first `steps` batches in float32 and bfloat16 compute."""
    batches = make_batches(cfg32, steps, seed=1)
    curves = {}
    for dtype in ("float32", "bfloat16"):
        step = FlaxStep(load_cfg(f"model.dtype={dtype}"), jax.devices()[:1])
        curves[dtype] = [step(b) for b in batches]
    return curves


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append(format(value, fmt) if isinstance(value, int | float) else str(value or ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_variants(
    cfg: config_lib.Config, matmul: MatmulStep, first_batch: np.ndarray
) -> dict[str, Step | str]:
    """flaxlm, the matmul yardstick and the PyTorch variants the arguments ask for."""
    devices = jax.devices()[:1]
    variants: dict[str, Step | str] = {"flaxlm": FlaxStep(cfg, devices), "fp32 matmul": matmul}
    if ARGS.bf16:
        variants["flaxlm bf16"] = FlaxStep(load_cfg("model.dtype=bfloat16"), devices)
    if not ARGS.no_torch:
        torch_variants = [("torch eager", False, False)]
        if not ARGS.no_compile:
            torch_variants.append(("torch.compile", True, False))
        if ARGS.bf16:
            torch_variants.append(("torch eager bf16", False, True))
            if not ARGS.no_compile:
                torch_variants.append(("torch.compile bf16", True, True))
        for name, comp, bf16 in torch_variants:
            step = try_build(name, lambda c=comp, b=bf16: TorchStep(cfg, c, b))
            variants[name] = check_compiles(name, step, first_batch) if comp else step
    return variants


def rates(
    median: float, tokens_per_step: int, fpt: float, peak: float, sustained: float
) -> dict[str, float]:
    """A variant's speed from its median step seconds: ms/step, tokens/s, FLOP/s and its shares
    of the best-of-10 and of the interleaved matmul rates."""
    tps = tokens_per_step / median
    return {
        "ms_per_step": median * 1e3,
        "tokens_per_s": tps,
        "gflops": tps * fpt / 1e9,
        "of_matmul_peak": tps * fpt / peak,
        "of_interleaved_matmul": tps * fpt / sustained,
    }


def compare_with_torch(rows: list[dict]) -> None:
    """Adds to the rows flaxlm's speed over each torch variant of the same precision."""
    measured = [r for r in rows if "tokens_per_s" in r]
    by_name = {r["variant"]: r for r in measured}
    for suffix in ("", " bf16"):
        ours = by_name.get("flaxlm" + suffix)
        theirs = [
            r
            for r in measured
            if r["variant"].startswith("torch") and r["variant"].endswith(" bf16") == bool(suffix)
        ]
        if ours and theirs:
            best = max(theirs, key=lambda r: r["tokens_per_s"])
            for r in theirs:
                r["flaxlm_over_this"] = ours["tokens_per_s"] / r["tokens_per_s"]
            ratio = ours["tokens_per_s"] / best["tokens_per_s"]
            ours["vs_best_torch"] = f"{ratio:.2f}x {best['variant']}"


def bf16_curve_report(cfg: config_lib.Config) -> dict:
    """The bf16 and fp32 loss curves, printed as a summary and returned with their distance."""
    curves = bf16_curves(cfg, ARGS.curve_steps)
    diff = np.abs(np.array(curves["bfloat16"]) - np.array(curves["float32"]))
    rel = diff / np.array(curves["float32"])
    print(
        f"\nbf16 vs fp32 loss curve, first {ARGS.curve_steps} steps: loss "
        f"{curves['float32'][0]:.3f} -> {curves['float32'][-1]:.3f} (fp32), "
        f"{curves['bfloat16'][0]:.3f} -> {curves['bfloat16'][-1]:.3f} (bf16); "
        f"max |diff| {diff.max():.4f} nats, max relative {rel.max():.4f}"
    )
    return {**curves, "max_abs_diff": diff.max(), "max_rel_diff": rel.max()}


# (row key, heading, number format) of the table of variants.
VARIANT_COLUMNS = [
    ("variant", "variant", ""),
    ("ms_per_step", "ms/step", ".1f"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("gflops", "GFLOP/s", ".1f"),
    ("of_matmul_peak", "of matmul peak", ".2f"),
    ("of_interleaved_matmul", "of interleaved matmul", ".2f"),
    ("flaxlm_over_this", "flaxlm / this", ".2f"),
    ("vs_best_torch", "flaxlm vs best torch", ""),
    ("error", "error", ""),
]


def main_vs_pytorch() -> dict:
    cfg = load_cfg()
    n_analytic = analytic_param_count(cfg.model)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, n_analytic, cfg.data.seq_len)
    batches = make_batches(cfg, ARGS.warmup + ARGS.steps)

    matmul = MatmulStep(flops_per_step(cfg, n_analytic))
    variants = build_variants(cfg, matmul, batches[0])
    counts = {name: getattr(s, "n_params", None) for name, s in variants.items()}
    for name, n in counts.items():
        if n is not None and n != EXPECTED_PARAMS:
            raise SystemExit(f"{name} has {n:,} parameters, expected {EXPECTED_PARAMS:,}")

    peaks: list[float] = [matmul_peak()]
    times = run_interleaved(variants, batches, peaks)
    peak = max(peaks)
    sustained = matmul.flops / statistics.median(times.pop("fp32 matmul"))
    del variants["fp32 matmul"]

    rows = []
    for name, step in variants.items():
        if isinstance(step, str):
            rows.append({"variant": name, "error": step})
            continue
        median = statistics.median(times[name])
        speed = rates(median, tokens_per_step, fpt, peak, sustained)
        rows.append({"variant": name, "params": counts[name], **speed})
    compare_with_torch(rows)

    print(
        f"\nconfig {CONFIG.relative_to(REPO)} {' '.join(ARGS.set)}: {n_analytic:,} parameters, "
        f"{fpt / 1e6:.1f} MFLOPs/token, {tokens_per_step} tokens/step; fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (best of 10), {sustained / 1e9:.1f} GFLOP/s interleaved with "
        f"the steps (median); median of {ARGS.repeats} x {ARGS.steps} steps\n"
    )
    print(table(rows, VARIANT_COLUMNS))
    result = {
        "benchmark": "vs_pytorch",
        "config": str(CONFIG.relative_to(REPO)),
        "overrides": ARGS.set,
        "params": n_analytic,
        "flops_per_token": fpt,
        "matmul_peak_flops": peak,
        "matmul_interleaved_flops": sustained,
        "steps": ARGS.steps,
        "repeats": ARGS.repeats,
        "rows": rows,
    }
    if ARGS.bf16:
        result["bf16_curve"] = bf16_curve_report(cfg)
    return result


def main_scaling() -> dict:
    n = ARGS.devices
    if jax.device_count() < n:
        raise SystemExit(f"--devices {n}: JAX sees {jax.device_count()} devices")
    cfg1 = load_cfg("mesh.data=1", "mesh.fsdp=1")
    batches = make_batches(cfg1, ARGS.warmup + ARGS.steps)
    layouts = {
        "1 device": (cfg1, jax.devices()[:1]),
        f"data={n}": (load_cfg(f"mesh.data={n}", "mesh.fsdp=1"), jax.devices()[:n]),
        f"fsdp={n}": (load_cfg("mesh.data=1", f"mesh.fsdp={n}"), jax.devices()[:n]),
    }
    steps = {name: FlaxStep(c, d) for name, (c, d) in layouts.items()}
    peaks: list[float] = [matmul_peak()]
    times = run_interleaved(steps, batches, peaks)
    tokens_per_step = cfg1.data.global_batch_size * cfg1.data.seq_len
    rows = []
    base = None
    for name, step in steps.items():
        devices = len(step.trainer.mesh.devices.flat)
        tps = tokens_per_step / statistics.median(times[name])
        per_device = tps / devices
        base = base or per_device
        rows.append(
            {
                "layout": name,
                "devices": devices,
                "tokens_per_s": tps,
                "tokens_per_s_per_device": per_device,
                "per_device_vs_1": per_device / base,
                **step.memory_per_device(),
            }
        )
    print(f"\nscaling on {n} forced host devices sharing {os.cpu_count()} cores\n")
    print(
        table(
            rows,
            [
                ("layout", "layout", ""),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("tokens_per_s_per_device", "tokens/s per device", ",.0f"),
                ("per_device_vs_1", "per device vs 1 device", ".3f"),
                ("arguments_mib", "arguments MiB/device", ".1f"),
                ("temporaries_mib", "temporaries MiB/device", ".1f"),
                ("total_mib", "total MiB/device", ".1f"),
            ],
        )
    )
    return {"benchmark": "vs_pytorch_scaling", "devices": n, "overrides": ARGS.set, "rows": rows}


def main() -> None:
    print(
        f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{os.cpu_count()} cores",
        file=sys.stderr,
    )
    result = main_scaling() if ARGS.devices else main_vs_pytorch()
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
