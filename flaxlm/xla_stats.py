"""What XLA says about a compiled program: its memory analysis and its cost analysis.

`flaxlm bench`, `flaxlm compile`, the memory model and the benchmarks read both through these
two functions. The figures are per device (XLA compiles one SPMD program that every device
runs), and both analyses count the body of a loop (`nn.scan` over layers, `lax.scan` over
micro-batches) once, not once per iteration. `collective_stats` reads the collectives (kind,
count, bytes) from the compiled program's HLO text.
"""

from __future__ import annotations

import math
import re
from typing import Any

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


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<kind>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<start>-start)?\((?P<rest>.*)$"
)
_SCATTER_FUSION = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<shape>.+?)\s+fusion\(.*calls=%all-reduce-scatter\b"
)
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_CHANNEL = re.compile(r"channel_id=(\d+)")


def _array_bytes(shape: str) -> list[int]:
    sizes = []
    for dtype, dims in _ARRAY.findall(shape):
        bits = 8 if dtype in ("pred",) or dtype.startswith("f8") else int(dtype[-2:].lstrip("f"))
        sizes.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
    return sizes


def _result_bytes(kind: str, start: bool, shape: str) -> int:
    """Bytes a collective delivers. An async start's result is (operands, results) and, for a
    collective-permute, two u32[] scalars of context: the results are the second half of the
    arrays once the scalars are dropped (combined collectives carry several of each)."""
    sizes = _array_bytes(shape)
    if not start or kind == "all-reduce":
        return sum(sizes)
    if kind == "collective-permute":
        arrays = _ARRAY.findall(shape)
        pairs = zip(sizes, arrays, strict=True)
        sizes = [n for n, (dtype, dims) in pairs if dims or dtype != "u32"]
    return sum(sizes[len(sizes) // 2 :])


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives of a compiled program's HLO text, by kind: {"count", "bytes"} per device
    (bytes of each collective's result). XLA may copy a collective into several computations
    (async start/update/done forms): one channel id counts once. A loop body counts once.

    libtpu writes some reduce-scatters as a fusion that calls an `all-reduce-scatter`
    computation (an all-reduce of the whole operand and a slice of it, run as one
    reduce-scatter): each counts as a reduce-scatter of the fusion's result, and the all-reduce
    inside is not counted.
    """
    seen: set[tuple[str, str]] = set()
    stats: dict[str, dict[str, int]] = {}

    def add(kind: str, nbytes: int) -> None:
        entry = stats.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes

    in_scatter_body = False
    for line in hlo_text.splitlines():
        if line.startswith(("%", "ENTRY")):  # the header of a computation
            in_scatter_body = line.startswith("%all-reduce-scatter")
        fused = _SCATTER_FUSION.match(line)
        if fused:
            add("reduce-scatter", sum(_array_bytes(fused["shape"])))
            continue
        match = _COLLECTIVE.match(line)
        if not match or in_scatter_body:
            continue
        kind = match["kind"]
        channel = _CHANNEL.search(match["rest"])
        key = (kind, channel.group(1) if channel else line.split("=", 1)[0].strip())
        if key in seen:
            continue
        seen.add(key)
        add(kind, _result_bytes(kind, bool(match["start"]), match["shape"]))
    return stats
