"""What XLA says about a compiled program: its memory analysis and its cost analysis.

`flaxlm bench`, `flaxlm compile`, the memory model and the benchmarks read both through these
two functions. The figures are per device (XLA compiles one SPMD program that every device
runs), and both analyses count the body of a loop (`nn.scan` over layers, `lax.scan` over
micro-batches, a windowed einsum) once, not once per iteration. `collective_stats` reads the
collectives (kind, count, bytes) of a whole step from the compiled program's HLO text.
"""

from __future__ import annotations

import dataclasses
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
# Replica groups listed ({{0,1},{2,3}}) or as an iota ([2,2]<=[4], [2,2]<=[2,2]T(1,0)).
_GROUPS = re.compile(
    r"replica_groups=(\{(?:\{[\d,]*\},?)*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)"
)
_PARTITIONS = re.compile(r"num_partitions=(\d+)")
# A transfer between slices: libtpu hands it to its megascale runtime as a send.
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


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


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a step: its kind, the bytes it delivers to each device, how many
    times a step runs it and the devices in each of its groups (0 where not read: a
    collective-permute). A transfer between TPU slices (DCN, by libtpu's megascale runtime) has
    kind `dcn-all-reduce`, `dcn-all-gather`, `dcn-one-to-one`, ...: bytes are what each device
    sends, and the group is the slices."""

    kind: str
    nbytes: int
    times: int
    group: int


def _group_size(attrs: str, partitions: int) -> int:
    """Devices per replica group: `{{0,1},{2,3}}` lists them, `[G,S]<=[...]` (iota groups)
    gives G groups of S, and `{}` is one group of every partition."""
    match = _GROUPS.search(attrs)
    if not match:
        return 0
    text = match.group(1)
    if text.startswith("["):
        return int(text[1:].split("]")[0].split(",")[-1])
    first = text.removeprefix("{").split("}")[0].strip("{")
    return len(first.split(",")) if first else partitions


def collectives(hlo_text: str, slices: int = 1) -> list[Collective]:
    """The collectives of a compiled program's HLO text, once each, with the times a step runs
    them (`flaxlm.hlo_program` reads the loops' trip counts; a loop whose count it cannot read
    counts once). `slices`: the TPU slices the program spans (the group of a DCN transfer).

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
    partitions = int(m.group(1)) if (m := _PARTITIONS.search(hlo_text)) else 1
    found: dict[str, Collective] = {}

    def add(key: str, kind: str, nbytes: int, times: int, group: int) -> None:
        times = min(times, found[key].times) if key in found else times
        found[key] = Collective(kind, nbytes, times, group)

    for name, computation in computations.items():
        times = runs.get(name, 0)
        if name.startswith("all-reduce-scatter") or not times:
            continue
        for instruction in computation.instructions.values():
            op, attrs = instruction.op, instruction.attrs
            called = [callee for _, callee in hlo_program.callees(instruction)]
            key = f"{name}/{instruction.name}"
            if op == "fusion" and any(c.startswith("all-reduce-scatter") for c in called):
                nbytes = hlo_program.shape_bytes(instruction.shape)
                callee = computations.get(called[0])
                inner = [i.attrs for i in callee.instructions.values()] if callee else []
                group = max((_group_size(a, partitions) for a in inner), default=0)
                add(key, "reduce-scatter", nbytes, times, group)
                continue
            transfer = _MEGASCALE.search(attrs)
            if op == "send" and transfer:
                kind = "dcn-" + transfer.group(1).lower().replace("_", "-")
                nbytes = hlo_program.array_bytes(instruction.shape)[0]
                add(key, kind, nbytes, times, slices)
                continue
            kind = op.removesuffix("-start")
            if kind not in _KINDS:
                continue
            channel = _CHANNEL.search(attrs)
            key = channel.group(1) if channel else key
            nbytes = _result_bytes(kind, op.endswith("-start"), instruction.shape)
            add(key, kind, nbytes, times, _group_size(attrs, partitions))
    return list(found.values())


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives of a compiled program's HLO text per step, by kind (`collectives`):
    {"count", "bytes"} per device (bytes of each collective's result; of a DCN transfer, what
    each device sends), every iteration of a loop counted."""
    stats: dict[str, dict[str, int]] = {}
    for c in collectives(hlo_text):
        entry = stats.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += c.times
        entry["bytes"] += c.nbytes * c.times
    return stats
