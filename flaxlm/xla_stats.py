"""What XLA says about a compiled program: its memory analysis and its cost analysis.

`flaxlm bench`, `flaxlm compile`, the memory model and the benchmarks read both through these
two functions. The figures are per device (XLA compiles one SPMD program that every device
runs), and both analyses count the body of a loop (`nn.scan` over layers, `lax.scan` over
micro-batches) once, not once per iteration.
"""

from __future__ import annotations

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
