"""The layouts the planner considers, which of them divide the model and the batch, and which
could fit.

A candidate is a mesh (devices along each axis within a slice, and slices along one axis), a
remat policy, a number of gradient-accumulation steps for the requested global batch (so a
per-device micro-batch), an attention kernel and scanned or unrolled layers. Every
combination is built as a config and kept only if `flaxlm.config.validate` and
`check_divisibility` accept it: the rules the trainer itself applies decide what divides.
The analytic memory model (`flaxlm.memory`) then drops those that cannot fit; it is
generous (`PRUNE_MARGIN`), because a candidate wrongly dropped is never compiled.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

from flaxlm import memory
from flaxlm.config import (
    MESH_AXES,
    AttentionKernel,
    Config,
    ConfigError,
    Remat,
    check_divisibility,
    validate,
)

# A candidate is dropped when the analytic estimate exceeds the HBM by more than this factor:
# the activation count is an estimate (XLA fuses, reuses and schedules buffers its own way).
# It overestimates what XLA compiles by up to 1.3x (Llama 3 70B on v5p:4x4x4, two sequences of
# 4096 per chip with q/k/v and block outputs kept: 126.8 GiB estimated, 97.7 compiled).
PRUNE_MARGIN = 1.5


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout: mesh sizes within a slice and across slices (in `MESH_AXES` order), remat,
    accumulation steps, attention kernel, scanned layers."""

    ici: tuple[int, ...]
    dcn: tuple[int, ...]
    remat: Remat
    accum: int
    attention: AttentionKernel
    scan: bool

    def mesh(self) -> dict[str, int]:
        """Devices along each axis over all slices."""
        return {a: i * d for a, i, d in zip(MESH_AXES, self.ici, self.dcn, strict=True)}

    def overrides(self) -> list[str]:
        """The `key.sub=value` overrides that turn the base config into this candidate (the
        context and expert axes only where they are split)."""
        pairs = zip(MESH_AXES, self.ici, strict=True)
        ici = [f"mesh.{a}={s}" for a, s in pairs if a in ("data", "fsdp", "tensor") or s > 1]
        dcn = [f"mesh.dcn_{a}={s}" for a, s in zip(MESH_AXES, self.dcn, strict=True) if s > 1]
        return [
            *ici,
            *dcn,
            f"model.remat={self.remat}",
            f"optimizer.grad_accum_steps={self.accum}",
            f"model.attention={self.attention}",
            f"model.scan_layers={str(self.scan).lower()}",
        ]

    def apply(self, cfg: Config) -> Config:
        """cfg laid out as this candidate (not validated)."""
        dcn = {f"dcn_{a}": s for a, s in zip(MESH_AXES, self.dcn, strict=True)}
        return dataclasses.replace(
            cfg,
            mesh=dataclasses.replace(
                cfg.mesh, **dict(zip(MESH_AXES, self.ici, strict=True)), **dcn
            ),
            model=dataclasses.replace(
                cfg.model, remat=self.remat, attention=self.attention, scan_layers=self.scan
            ),
            optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=self.accum),
        )

    def micro_batch(self, cfg: Config) -> float:
        """Rows per device in each micro-batch (the batch axes split the rows)."""
        mesh = self.mesh()
        shards = math.prod(mesh.get(a, 1) for a in cfg.mesh.rules.get("batch", []))
        return cfg.data.global_batch_size / self.accum / shards

    def layout(self) -> str:
        """The mesh as the config spells it: `fsdp=4 tensor=2`, `fsdp=256 dcn_data=2`."""
        ici = [f"{a}={s}" for a, s in zip(MESH_AXES, self.ici, strict=True) if s > 1]
        dcn = [f"dcn_{a}={s}" for a, s in zip(MESH_AXES, self.dcn, strict=True) if s > 1]
        return " ".join([*ici, *dcn]) or "1 device"

    def label(self) -> str:
        scan = "" if self.scan else " unrolled"
        return f"{self.layout()} | remat={self.remat} | accum={self.accum} | {self.attention}{scan}"

    def to_json(self) -> dict[str, Any]:
        return {
            "layout": self.layout(),
            "mesh": self.mesh(),
            "dcn": {a: s for a, s in zip(MESH_AXES, self.dcn, strict=True) if s > 1},
            "remat": str(self.remat),
            "grad_accum_steps": self.accum,
            "attention": str(self.attention),
            "scan_layers": self.scan,
        }


@dataclasses.dataclass(frozen=True)
class Space:
    """What to enumerate: the mesh axes to split, and the choices of each setting."""

    axes: tuple[str, ...] = ("data", "fsdp", "tensor")
    remats: tuple[Remat, ...] = tuple(Remat)
    attentions: tuple[AttentionKernel, ...] = (AttentionKernel.xla,)
    scans: tuple[bool, ...] = (True,)
    max_accum: int = 16
    # The axes the slices may run along (DCN carries the per-step traffic of these only).
    dcn_axes: tuple[str, ...] = ("data", "fsdp")


def factorizations(n: int, k: int) -> Iterator[tuple[int, ...]]:
    """Every ordered k-tuple of positive integers whose product is n."""
    if k == 1:
        yield (n,)
        return
    for first in range(1, n + 1):
        if n % first == 0:
            for rest in factorizations(n // first, k - 1):
                yield (first, *rest)


def _meshes(
    space: Space, per_slice: int, slices: int
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    dcn_choices = [dict.fromkeys(MESH_AXES, 1)]
    if slices > 1:
        dcn_choices = [{**dict.fromkeys(MESH_AXES, 1), a: slices} for a in space.dcn_axes]
    for sizes in factorizations(per_slice, len(space.axes)):
        ici = {**dict.fromkeys(MESH_AXES, 1), **dict(zip(space.axes, sizes, strict=True))}
        for dcn in dcn_choices:
            yield tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES)


def enumerate_candidates(
    cfg: Config, devices_per_slice: int, slices: int, space: Space
) -> list[Candidate]:
    """Every candidate of `space` for cfg on slices x devices_per_slice devices that the
    config's own checks accept: each mesh axis divides what it shards, and the batch axes
    divide each micro-batch."""
    batch = cfg.data.global_batch_size
    accums = [a for a in range(1, min(batch, space.max_accum) + 1) if batch % a == 0]
    found = []
    for (ici, dcn), remat, accum, attention, scan in itertools.product(
        _meshes(space, devices_per_slice, slices),
        space.remats,
        accums,
        space.attentions,
        space.scans,
    ):
        candidate = Candidate(ici, dcn, remat, accum, attention, scan)
        if divides(candidate, cfg):
            found.append(candidate)
    return found


def divides(candidate: Candidate, cfg: Config) -> bool:
    """Whether the config's checks accept cfg laid out as candidate."""
    laid_out = candidate.apply(cfg)
    try:
        validate(laid_out)
        check_divisibility(laid_out, candidate.mesh())
    except ConfigError:
        return False
    return True


def memory_estimates(
    cfg: Config, candidates: Sequence[Candidate], devices: Sequence[Any]
) -> list[memory.MemoryEstimate]:
    """The analytic per-device memory of each candidate on `devices` (the train state's
    shards are exact: each mesh's state is laid out once, without compiling)."""
    from flaxlm.mesh import make_mesh
    from flaxlm.train import Trainer

    states: dict[tuple, Any] = {}
    estimates = []
    for c in candidates:
        laid_out = c.apply(cfg)
        key = (c.ici, c.dcn, c.scan)
        if key not in states:
            states[key] = Trainer(laid_out, make_mesh(laid_out, devices)).abstract_state
        estimates.append(memory.estimate(laid_out, states[key], c.mesh()))
    return estimates


def could_fit(
    estimate: memory.MemoryEstimate, hbm_gib: float | None, margin: float = PRUNE_MARGIN
) -> bool:
    """Whether a candidate of this analytic estimate is worth compiling on a device of
    hbm_gib (None: the memory is unknown, and every candidate is): its estimate is within
    `margin` times the memory."""
    return hbm_gib is None or estimate.total / memory.GiB <= hbm_gib * margin
