"""What XLA says about a compiled program: its memory analysis and its cost analysis.

`flaxlm bench`, `flaxlm compile`, the memory model and the benchmarks read both through these
two functions. The figures are per device (XLA compiles one SPMD program that every device
runs), and both analyses count the body of a loop (`nn.scan` over layers, `lax.scan` over
micro-batches, a windowed einsum) once, not once per iteration. `collective_stats` reads the
collectives (kind, count, bytes) of a whole step from the compiled program's HLO text.
"""

from __future__ import annotations

import re
from typing import Any

from flaxlm import hlo_program

# Cost-analysis keys as XLA names them, and the names flaxlm reports them under.
_COST_KEYS = {
    "flops": "flops",
    "bytes accessed": "bytes_accessed",
    "optimal_seconds": "optimal_seconds",  # XLA's estimated time, on TPU
}


def memory_stats(compiled: Any) -> dict[str, int] | None:
    """Per-device bytes from XLA's memory analysis (None where the backend gives none):
    arguments, outputs, aliased, temporaries, code, and `live`, the buffers live at the peak
    (arguments plus outputs not aliased to donated arguments, plus temporaries)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    stats = {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
        "code": int(getattr(ma, "generated_code_size_in_bytes", 0)),
    }
    # Donated state is both an argument and an output but occupies its buffers once.
    stats["live"] = stats["arguments"] + stats["outputs"] - stats["aliased"] + stats["temporaries"]
    return stats


def cost_stats(compiled: Any) -> dict[str, float]:
    """Per-device figures from XLA's cost analysis, those the backend gives of: `flops`,
    `bytes_accessed` and `optimal_seconds` (empty where it gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis:
        return {}
    return {ours: float(analysis[key]) for key, ours in _COST_KEYS.items() if key in analysis}


_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_CHANNEL = re.compile(r"channel_id=(\d+)")


def _result_bytes(kind: str, start: bool, shape: str) -> int:
    """Bytes a collective delivers. An async start's result is (operands, results) and, for a
    collective-permute, two u32[] scalars of context: the results are the second half of the
    arrays once the scalars are dropped (combined collectives carry several of each)."""
    sizes = hlo_program.array_bytes(shape)
    if not start or kind == "all-reduce":
        return sum(sizes)
    if kind == "collective-permute":
        arrays = hlo_program.arrays(shape)
        pairs = zip(sizes, arrays, strict=True)
        sizes = [n for n, (dtype, dims) in pairs if dims or dtype != "u32"]
    return sum(sizes[len(sizes) // 2 :])


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives of a compiled program's HLO text per step, by kind: {"count", "bytes"} per
    device (bytes of each collective's result). A collective in a loop body counts once per
    iteration (`flaxlm.hlo_program` reads the trip counts; a loop whose count it cannot read
    counts once).

    One channel id is one collective. libtpu splits some into the steps of an async collective
    fusion, several fusions that carry the same collective while computing, and may spread
    those steps over a loop's iterations and the code around it: such a collective counts as
    many times as the computation that runs it least often. libtpu also writes some
    reduce-scatters as a fusion that calls an `all-reduce-scatter` computation (an all-reduce
    of the whole operand and a slice of it, run as one reduce-scatter): each counts as a
    reduce-scatter of the fusion's result, and the all-reduce inside is not counted.
    """
    computations = hlo_program.parse(hlo_text)
    runs, _, _ = hlo_program.run_counts(computations)
    found: dict[str, tuple[str, int, int]] = {}  # channel: kind, bytes, times per step

    def add(key: str, kind: str, nbytes: int, times: int) -> None:
        times = min(times, found[key][2]) if key in found else times
        found[key] = (kind, nbytes, times)

    for name, computation in computations.items():
        times = runs.get(name, 0)
        if name.startswith("all-reduce-scatter") or not times:
            continue
        for instruction in computation.instructions.values():
            op = instruction.op
            called = [callee for _, callee in hlo_program.callees(instruction)]
            if op == "fusion" and any(c.startswith("all-reduce-scatter") for c in called):
                key = f"{name}/{instruction.name}"
                add(key, "reduce-scatter", hlo_program.shape_bytes(instruction.shape), times)
                continue
            kind = op.removesuffix("-start")
            if kind not in _KINDS:
                continue
            channel = _CHANNEL.search(instruction.attrs)
            key = channel.group(1) if channel else f"{name}/{instruction.name}"
            add(key, kind, _result_bytes(kind, op.endswith("-start"), instruction.shape), times)
    stats: dict[str, dict[str, int]] = {}
    for kind, nbytes, times in found.values():
        entry = stats.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += times
        entry["bytes"] += nbytes * times
    return stats
