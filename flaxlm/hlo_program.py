"""A compiled program's HLO text, read as computations: what runs how many times per step.

XLA's cost analysis counts the body of a while loop once. Compiled for TPU, a step has loops the
model never wrote: SPMD partitioning turns a matmul whose operand is sharded into a windowed
einsum (`windowed_dot_general_body_*`), a loop over the shards that computes one or two of them
per iteration while the next arrive by collective permutes. With scanned layers or micro-batches
the layer and accumulation loops come on top. This module reads the program's computations,
finds each loop's trip count from its condition (`counter < limit`), its counter's increment in
the body and its initial value in the caller, and says how many times each computation runs per
step and how many times the cost analysis counted it.

`flaxlm.hlo_cost` prices what runs: matmul FLOPs, HBM bytes and a roofline, loops counted by
their trip counts. The HLO text is that of `compiled.as_text()`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[^\s(]+)\s")
_INSTRUCTION = re.compile(r"^\s*(?P<root>ROOT\s+)?%(?P<name>\S+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|condition|body)=%([^\s,}]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")


@dataclass
class Instruction:
    name: str
    shape: str
    op: str
    args: str  # the text between the opcode's parentheses
    attrs: str  # the text after them
    operands: list[str] = field(default_factory=list)


@dataclass
class Computation:
    name: str
    entry: bool
    fused: bool = False  # called by a fusion: its instructions touch no memory of their own
    instructions: dict[str, Instruction] = field(default_factory=dict)
    root: str = ""

    def users(self) -> dict[str, list[str]]:
        """The instructions that use each instruction, by name."""
        found: dict[str, list[str]] = defaultdict(list)
        for instruction in self.instructions.values():
            for operand in dict.fromkeys(instruction.operands):
                found[operand].append(instruction.name)
        return found

    def shape(self, name: str) -> str:
        found = self.instructions.get(name)
        return found.shape if found else ""


def _split_shape(rest: str) -> tuple[str, str]:
    """(shape, the rest) of an instruction's right-hand side: a shape is a tuple or a word."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _split_args(text: str) -> tuple[str, str]:
    """(args, attrs) of `(args), attrs`, the parentheses balanced."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[1:i], text[i + 1 :]
    return text[1:], ""


def _logical_lines(hlo_text: str) -> list[str]:
    """The text's lines, with the continuations of a string that holds newlines (a custom
    call's backend config) joined to the instruction they belong to."""
    lines: list[str] = []
    for line in hlo_text.splitlines():
        starts = line.startswith((" ", "%", "ENTRY", "HloModule")) or line.rstrip() == "}"
        if lines and line and not starts:
            lines[-1] += "\n" + line
        else:
            lines.append(line)
    return lines


def parse(hlo_text: str) -> dict[str, Computation]:
    """The computations of an HLO module's text, by name."""
    computations: dict[str, Computation] = {}
    current: Computation | None = None
    for line in _logical_lines(hlo_text):
        if line.rstrip() == "}":
            current = None
            continue
        header = _HEADER.match(line)
        if header:
            current = Computation(header["name"], bool(header["entry"]))
            computations[current.name] = current
            continue
        match = _INSTRUCTION.match(line)
        if current is None or not match:
            continue
        shape, after = _split_shape(match["rest"])
        opening = after.find("(")
        if opening < 0:
            continue
        args, attrs = _split_args(after[opening:])
        instruction = Instruction(
            match["name"], shape, after[:opening], args, attrs, re.findall(r"%([^\s,)]+)", args)
        )
        current.instructions[instruction.name] = instruction
        if match["root"]:
            current.root = instruction.name
    for computation in computations.values():
        for instruction in computation.instructions.values():
            if instruction.op == "fusion":
                for _, callee in callees(instruction):
                    if callee in computations:
                        computations[callee].fused = True
    return computations


def callees(instruction: Instruction) -> list[tuple[str, str]]:
    """(how, computation) for each computation an instruction calls."""
    found = _CALLS.findall(instruction.attrs)
    for group in _CALL_LISTS.findall(instruction.attrs):
        found += [("branch", name) for name in re.findall(r"%([^\s,]+)", group)]
    return found


def dims(shape: str) -> list[int]:
    """The dimensions of an array shape (the first array of a tuple)."""
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def arrays(shape: str) -> list[tuple[str, str]]:
    """(dtype, dims) of each array in a shape, in order: `bf16[8,128]` gives ("bf16", "8,128")."""
    return _ARRAY.findall(shape)


def array_bytes(shape: str) -> list[int]:
    """Bytes of each array in a shape, in order."""
    sizes = []
    for dtype, ds in arrays(shape):
        bits = 8 if dtype == "pred" or dtype.startswith("f8") else int(re.sub(r"\D", "", dtype))
        sizes.append(math.prod(int(d) for d in ds.split(",") if d) * bits // 8)
    return sizes


def shape_bytes(shape: str) -> int:
    """Bytes of every array in a shape (a tuple's arrays summed)."""
    return sum(array_bytes(shape))


def _source(computation: Computation, name: str) -> Instruction | None:
    """The instruction that defines `name`, looking through copies (libtpu copies a loop's
    counter between memory spaces) and conversions."""
    found = computation.instructions.get(name)
    while found is not None and found.op in ("copy", "bitcast", "convert") and found.operands:
        found = computation.instructions.get(found.operands[0])
    return found


def _unwrapped(
    computations: dict[str, Computation], computation: Computation, name: str
) -> Instruction | None:
    """The instruction that defines `name`; a fusion of one operation on its parameters
    (XLA's CPU compiler wraps scalar adds and compares so) as that operation on its operands."""
    found = _source(computation, name)
    if found is None or found.op != "fusion":
        return found
    fused = computations.get(next((c for _, c in callees(found)), ""))
    inner = fused.instructions.get(fused.root) if fused else None
    if inner is None:
        return found
    operands = []
    for operand in inner.operands:
        parameter = fused.instructions.get(operand)
        if parameter is None or parameter.op != "parameter":
            return found
        operands.append(found.operands[int(parameter.args)])
    return Instruction(found.name, found.shape, inner.op, inner.args, inner.attrs, operands)


def _int_constant(computation: Computation, name: str) -> int | None:
    found = _source(computation, name)
    if found is None or found.op != "constant":
        return None
    try:
        return int(found.args)
    except ValueError:
        return None


def _tuple_index(instruction: Instruction | None) -> int | None:
    if instruction is None or instruction.op != "get-tuple-element":
        return None
    match = re.search(r"index=(\d+)", instruction.attrs)
    return int(match.group(1)) if match else None


def trip_count(
    computations: dict[str, Computation], caller: Computation, loop: Instruction
) -> int | None:
    """Iterations of a while loop whose condition compares a counter with a constant, whose
    body adds a constant to the counter and whose initial counter is a constant (scans,
    windowed einsums); None for any other loop."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
    if known:  # XLA's CPU and GPU compilers write it down
        return int(known.group(1))
    called = dict(callees(loop))
    condition = computations.get(called.get("condition", ""))
    body = computations.get(called.get("body", ""))
    if condition is None or body is None:
        return None
    compare = _unwrapped(computations, condition, condition.root)
    if compare is None or compare.op != "compare" or len(compare.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", compare.attrs)
    direction = direction.group(1) if direction else ""
    left, right = compare.operands
    if _tuple_index(_source(condition, left)) is None:  # limit > counter
        left, right = right, left
        direction = {"GT": "LT", "GE": "LE"}.get(direction, "")
    index = _tuple_index(_source(condition, left))
    limit = _int_constant(condition, right)
    result = body.instructions.get(body.root)
    if index is None or limit is None or result is None or result.op != "tuple":
        return None
    step = _increment(computations, body, result.operands[index], index)
    start = caller.instructions.get(loop.operands[0]) if loop.operands else None
    if start is None or start.op != "tuple" or step is None or step <= 0:
        return None
    first = _int_constant(caller, start.operands[index])
    if first is None:
        return None
    if direction == "LT":
        return max(0, -(-(limit - first) // step))
    if direction == "LE":
        return max(0, (limit - first) // step + 1)
    return None


def _increment(
    computations: dict[str, Computation], body: Computation, name: str, index: int
) -> int | None:
    """The constant the body adds to tuple element `index` (None if it does something else)."""
    update = _unwrapped(computations, body, name)
    if update is None or update.op != "add" or len(update.operands) != 2:
        return None
    for counter, step in (update.operands, update.operands[::-1]):
        if _tuple_index(_source(body, counter)) == index:
            return _int_constant(body, step)
    return None


def run_counts(
    computations: dict[str, Computation],
) -> tuple[dict[str, int], dict[str, int], int]:
    """(runs, counted, unknown): how many times each computation runs per step, how many
    times XLA's cost analysis counts it (a loop body once per run of its loop), and the loops
    whose trip count could not be read (counted as running once)."""
    runs: dict[str, int] = defaultdict(int)
    counted: dict[str, int] = defaultdict(int)
    unknown = 0
    order = _callers_first(computations)
    for name in order:
        computation = computations[name]
        if computation.entry:
            runs[name] += 1
            counted[name] += 1
        if not runs[name] and not counted[name]:
            continue
        for instruction in computation.instructions.values():
            trips = 1
            if instruction.op == "while":
                found = trip_count(computations, computation, instruction)
                unknown += found is None
                trips = 1 if found is None else found
            for how, callee in callees(instruction):
                if callee not in computations:
                    continue
                per_run = trips if how in ("body", "condition") else 1
                runs[callee] += runs[name] * per_run
                counted[callee] += counted[name]
    return dict(runs), dict(counted), unknown


def _callers_first(computations: dict[str, Computation]) -> list[str]:
    """Computation names, each after every computation that calls it."""
    called_by: dict[str, set[str]] = {name: set() for name in computations}
    for name, computation in computations.items():
        for instruction in computation.instructions.values():
            for _, callee in callees(instruction):
                if callee in called_by:
                    called_by[callee].add(name)
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        done.add(name)
        for caller in sorted(called_by[name]):
            visit(caller)
        order.append(name)

    for name in computations:
        visit(name)
    return order
