"""`flaxlm plan`: enumeration, pruning, pricing of compiled programs, the cache, the command."""

from __future__ import annotations

import json
import math

import pytest
from helpers import flaxlm

from flaxlm import config, memory, step_time, xla_stats
from flaxlm.config import AttentionKernel, Remat
from flaxlm.plan import candidates, compile, planner
from flaxlm.plan.candidates import Candidate, Space

TILED = ("data.global_batch_size=16", "model.d_model=256", "model.d_ff=1024", "model.n_heads=2")


def _divides_independently(c: Candidate, cfg) -> bool:
    """The divisibility rules written out for the default rules table (an oracle that does
    not call the config's own checks)."""
    m, mesh = cfg.model, c.mesh()
    rows = cfg.data.global_batch_size // c.accum
    return (
        cfg.data.global_batch_size % c.accum == 0
        and rows % (mesh["data"] * mesh["fsdp"] * mesh["expert"]) == 0
        and m.n_heads % mesh["tensor"] == 0
        and m.kv_heads % mesh["tensor"] == 0
        and m.d_ff % mesh["tensor"] == 0
        and m.vocab_size % mesh["tensor"] == 0
        and m.d_model % (mesh["fsdp"] * mesh["context"]) == 0
    )


def test_every_candidate_divides_the_model_and_the_batch(tiny_cfg):
    cfg = tiny_cfg("data.global_batch_size=8", "model.n_heads=4", "model.n_kv_heads=2")
    space = Space(remats=(Remat.none, Remat.full), max_accum=8)
    found = candidates.enumerate_candidates(cfg, 8, 1, space)
    assert found and len(set(found)) == len(found)
    for c in found:
        assert math.prod(c.mesh().values()) == 8
        assert _divides_independently(c, cfg), c.label()
        assert c.micro_batch(cfg) == int(c.micro_batch(cfg)) >= 1
    # Completeness: every layout of the space that divides is there, once per remat policy.
    layouts = {(c.ici, c.accum) for c in found}
    for ici in candidates.factorizations(8, 3):
        for accum in (1, 2, 4, 8):
            c = Candidate((ici[0], ici[1], 1, ici[2], 1), (1,) * 5, Remat.none, accum,
                          AttentionKernel.xla, True)  # fmt: skip
            assert ((c.ici, accum) in layouts) == _divides_independently(c, cfg), c.label()
    assert len(found) == 2 * len(layouts)
    # The two kv heads cap tensor parallelism at 2.
    assert max(c.mesh()["tensor"] for c in found) == 2


def test_slices_go_along_the_data_or_fsdp_axis(tiny_cfg):
    cfg = tiny_cfg("data.global_batch_size=16")
    found = candidates.enumerate_candidates(cfg, 4, 2, Space(remats=(Remat.none,), max_accum=1))
    assert {tuple(s for s in c.dcn if s > 1) for c in found} == {(2,)}
    assert {c.dcn.index(2) for c in found} == {0, 1}  # data, fsdp
    assert all(math.prod(c.ici) == 4 for c in found)


@pytest.mark.slow
def test_the_pruning_keeps_every_candidate_that_xla_says_fits(tiny_cfg):
    """The memory model may overestimate, never by more than its margin: with the memory set
    at exactly what XLA compiled for a candidate, that candidate is still compiled."""
    cfg = tiny_cfg("data.global_batch_size=16", "data.seq_len=64", "model.n_layers=4")
    space = Space(axes=("fsdp", "tensor"), remats=(Remat.none, Remat.full), max_accum=2)
    found = candidates.enumerate_candidates(cfg, 8, 1, space)
    target = planner.make_target(None)
    import jax

    estimates = candidates.memory_estimates(cfg, found, jax.devices())
    compiled = [compile.compile_program(c.apply(cfg), target)["memory"] for c in found]
    sizes = [m["total_gib"] for m in compiled]
    for c, estimate, size in zip(found, estimates, sizes, strict=True):
        assert candidates.could_fit(estimate, size), (c.label(), estimate.total / memory.GiB, size)
    # And it prunes: at the smallest compiled size, some candidates are not worth compiling.
    assert not all(candidates.could_fit(e, min(sizes)) for e in estimates)


def test_a_scanned_step_is_priced_like_the_unrolled_one(tiny_cfg):
    """The per-layer correction: the scanned program's loop is counted by its trip count,
    its compute and its collectives, so its estimate is that of the unrolled program."""
    target = planner.make_target("v5e:2x2")
    layers = (*TILED, "model.n_layers=4", "mesh.fsdp=2", "mesh.tensor=2")
    prices = {}
    for scan in (False, True):
        cfg = tiny_cfg(*layers, f"model.scan_layers={str(scan).lower()}")
        prices[scan] = planner.price(cfg, compile.compile_program(cfg, target), target)
    unrolled, scanned = prices[False], prices[True]
    assert scanned["unknown_loops"] == 0
    for key in ("compute_seconds", "ici_bytes", "estimated_step_seconds"):
        assert scanned[key] == pytest.approx(unrolled[key], rel=0.05), key
    assert unrolled["ici_bytes"] > 0 and scanned["estimated_mfu"] > 0


def test_slices_exchange_gradients_over_dcn(tiny_cfg):
    """With the data axis across two slices, libtpu's DCN transfers are the gradient
    all-reduce: each device sends its gradient shard (float32) once per step."""
    cfg = tiny_cfg(*TILED, "mesh.fsdp=2", "mesh.tensor=2", "mesh.dcn_data=2")
    target = planner.make_target("v5e:2x2", slices=2)
    program = compile.compile_program(cfg, target)
    found = xla_stats.collectives(program["hlo"], slices=2)
    dcn = [c for c in found if c.kind.startswith("dcn-")]
    params = sum(math.prod(s) for s in _param_shapes(cfg))
    sent = sum(c.nbytes * c.times for c in dcn if c.kind == "dcn-all-reduce")
    assert sent == pytest.approx(4 * params / 4, rel=0.1)  # float32 over fsdp x tensor = 4
    priced = planner.price(cfg, program, target)
    # Over 2 slices an all-reduce puts 2 (s-1)/s = 1 times its bytes on the wire.
    wire = sum(step_time.wire_bytes(c) * c.times for c in dcn)
    assert priced["dcn_bytes"] == pytest.approx(wire) and wire >= sent
    assert priced["dcn_seconds"] == pytest.approx(wire / target.rates[3])


def _param_shapes(cfg) -> list[tuple[int, ...]]:
    import jax

    from flaxlm.model import Transformer

    model = Transformer(cfg.model)
    tokens = jax.ShapeDtypeStruct((1, cfg.data.seq_len), "int32")
    shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
    return [leaf.shape for leaf in jax.tree.leaves(shapes)]


def test_wire_bytes_follow_the_ring_algorithms():
    c = xla_stats.Collective
    assert step_time.wire_bytes(c("all-gather", 800, 1, 8)) == 700
    assert step_time.wire_bytes(c("reduce-scatter", 100, 1, 8)) == 700
    assert step_time.wire_bytes(c("all-reduce", 800, 1, 8)) == 1400
    assert step_time.wire_bytes(c("dcn-all-reduce", 800, 1, 2)) == 800
    assert step_time.wire_bytes(c("collective-permute", 800, 1, 0)) == 800


def test_compiled_programs_are_cached(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("data.global_batch_size=8")
    target = planner.make_target(None)
    cache = tmp_path / "cache"
    first: dict = {}
    compile.compile_all([cfg], target, 1, cache, lambda i, r: first.update(r))
    assert not first["cached"] and first["hlo"]
    assert sorted(p.suffix for p in cache.iterdir()) == [".gz", ".json"]

    def no_compile(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(compile, "compile_program", no_compile)
    again: dict = {}
    compile.compile_all([cfg], target, 1, cache, lambda i, r: again.update(r))
    assert again["cached"] and again["hlo"] == first["hlo"] and again["memory"] == first["memory"]
    # Another config, another topology, other library versions: other programs.
    other = config.replace(cfg, model={"remat": Remat.full})
    assert compile.cache_key(other, target) != compile.cache_key(cfg, target)
    elsewhere = planner.make_target("v5e:2x2")
    assert compile.cache_key(cfg, elsewhere) != compile.cache_key(cfg, target)
    before = compile.cache_key(cfg, target)
    monkeypatch.setattr(compile, "_versions", lambda: {"jax": "0.0.0"})
    assert compile.cache_key(cfg, target) != before


@pytest.mark.slow
def test_plan_command_ranks_writes_and_applies(tmp_path):
    out, chosen = tmp_path / "out", tmp_path / "chosen.yaml"
    result = flaxlm(
        "plan", "--config", "configs/bench/cpu.yaml", "--compile", "3", "--remat", "none",
        "full", "--cache", str(tmp_path / "cache"), "--out", str(out), "--apply", str(chosen),
        "data.global_batch_size=8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    seconds = [r["estimated_step_seconds"] for r in rows]
    assert seconds == sorted(seconds) and all(r["fits"] for r in rows)
    assert (out / "plan.png").stat().st_size > 0 and (out / "plan.jsonl").exists()
    assert "flaxlm train --config configs/bench/cpu.yaml" in result.stderr
    applied = config.load(chosen)
    best = rows[0]
    assert applied.model.remat == Remat(best["remat"])
    assert applied.optimizer.grad_accum_steps == best["grad_accum_steps"]
    assert applied.mesh.total_shape() == best["mesh"]


def test_plan_command_rejects_bad_input(tmp_path):
    no_topology = flaxlm("plan", "--config", "configs/bench/cpu.yaml", "--slices", "2", check=False)
    assert no_topology.returncode == 2 and "--slices needs --topology" in no_topology.stderr
    bad = flaxlm("plan", "--config", "configs/bench/cpu.yaml", "--topology", "v9:2x2", check=False)
    assert bad.returncode == 2 and "not a TPU topology name" in bad.stderr
    remat = flaxlm("plan", "--config", "configs/bench/cpu.yaml", "--remat", "most", check=False)
    assert remat.returncode == 2 and "--remat takes" in remat.stderr


def test_the_analytic_order_prices_what_each_choice_costs(tiny_cfg):
    """The order in which candidates are compiled: recomputation costs time, an unfused
    attention kernel pays for its score matrices, and slices joined along fsdp (parameters
    gathered every micro-batch) cost more DCN time than along data (one all-reduce)."""
    from flaxlm.plan import analytic

    cfg = tiny_cfg("data.global_batch_size=16", "data.seq_len=128", "model.max_seq_len=128")
    rates = (1e12, 1e11, 1e10, 1e9)

    def seconds(ici, dcn=(1,) * 5, remat=Remat.none, attention=AttentionKernel.splash, accum=1):
        c = Candidate(ici, dcn, remat, accum, attention, True)
        return analytic.analytic_seconds(c, cfg, rates, overlap=False)["estimated_step_seconds"]

    fsdp = (1, 4, 1, 1, 1)
    assert seconds(fsdp, remat=Remat.full) > seconds(fsdp, remat=Remat.save_dots) > seconds(fsdp)
    assert seconds(fsdp, attention=AttentionKernel.xla) > seconds(fsdp)
    assert seconds(fsdp, accum=4) > seconds(fsdp)  # the parameters gathered 4 times
    across_data, across_fsdp = (2, 1, 1, 1, 1), (1, 2, 1, 1, 1)
    one_slice = seconds((2, 4, 1, 1, 1))  # the same 8 devices, data over ICI
    assert seconds(fsdp, across_fsdp) > seconds(fsdp, across_data) > one_slice


def test_a_chip_is_counted_once_per_slice():
    """libtpu shows a v4 chip as two devices; two v6e slices have chips at the same
    coordinates, each its own: the rates per device follow."""
    from flaxlm import aot
    from flaxlm.flops import devices_per_chip

    assert devices_per_chip(aot.topology_devices("v4:2x2x1")) == 2
    assert devices_per_chip(aot.topology_devices("v6e:2x2", num_slices=2)) == 1
    one, two = planner.make_target("v6e:2x2"), planner.make_target("v6e:2x2", slices=2)
    assert one.rates == two.rates and one.hbm_gib == two.hbm_gib == 32
