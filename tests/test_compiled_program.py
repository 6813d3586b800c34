"""The program XLA is handed: activation constraints, kernels and loop costs, read from the
lowered or compiled train step (8 CPU devices, or TPU topologies through libtpu)."""

from __future__ import annotations

import re

import pytest

from flaxlm.mesh import make_mesh
from flaxlm.train import Trainer

# The batch axis of activations goes over the mesh's batch axes (data, fsdp and expert).
BATCH = '{"data", "fsdp", "expert"}'
BATCH_SHARDED = re.compile(r"sharding_constraint %\S+ <@mesh, \[" + re.escape(BATCH))


def _constraints(trainer: Trainer) -> list[str]:
    text = trainer.lower_step().as_text()
    return [line for line in text.splitlines() if "sharding_constraint" in line]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_constraints_reach_the_lowered_step(tiny_cfg, family):
    cfg = tiny_cfg("mesh.fsdp=4", "mesh.tensor=2", family=family)
    constraints = _constraints(Trainer(cfg, make_mesh(cfg)))
    layers = cfg.model.n_layers
    # Per block: its output, q, k, v, the attention output and the MLP hidden; then the
    # embeddings and the logits. Each is constrained in the forward pass and its gradient in
    # the backward pass.
    batch_sharded = [c for c in constraints if BATCH_SHARDED.search(c)]
    assert len(batch_sharded) >= 2 * (6 * layers + 2), constraints
    # (batch, length, heads, head_dim): the length over its (context) axes, heads over tensor.
    heads_on_tensor = [c for c in batch_sharded if re.search(r'\{[^}]*\}, \{"tensor"\}, \{\}\]', c)]
    assert len(heads_on_tensor) >= 2 * 4 * layers


def test_micro_batches_keep_their_rows_on_every_device(tiny_cfg):
    cfg = tiny_cfg("mesh.fsdp=8", "data.global_batch_size=16", "optimizer.grad_accum_steps=2")
    constraints = _constraints(Trainer(cfg, make_mesh(cfg)))
    # (micro-batches, rows, length): the rows of each micro-batch split over data x fsdp.
    assert any(f"[{{}}, {BATCH}, {{}}]" in c for c in constraints)


# TPU layouts pad small dimensions to tiles of 128: keep the model's dimensions multiples of it.
TILED = ("model.d_model=256", "model.d_ff=512", "model.n_heads=2", "model.dtype=bfloat16")


def _tpu_trainer(tiny_cfg, topology: str, *overrides: str, family: str = "llama") -> Trainer:
    pytest.importorskip("libtpu")
    from flaxlm import aot

    cfg = tiny_cfg(*TILED, *overrides, family=family)
    return Trainer(cfg, make_mesh(cfg, aot.topology_devices(topology)))


def test_splash_for_a_tpu_topology_is_the_mosaic_kernel(tiny_cfg):
    trainer = _tpu_trainer(
        tiny_cfg, "v5e:2x2", "model.attention=splash", "data.seq_len=128", "model.max_seq_len=128"
    )
    text = trainer.lower_step().as_text()
    # The TPU kernel, not the Pallas interpreter (a loop over the kernel's grid) that this
    # CPU process would run.
    assert "tpu_custom_call" in text
    assert "stablehlo.while" not in text


def test_cross_entropy_matches_optax_in_float32():
    import jax
    import numpy as np
    import optax

    from flaxlm.losses import cross_entropy

    k1, k2 = jax.random.split(jax.random.key(0))
    logits_BxTxV = 4 * jax.random.normal(k1, (2, 8, 50))
    targets_BxT = jax.random.randint(k2, (2, 8), 0, 50)
    want = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    np.testing.assert_allclose(cross_entropy(logits_BxTxV, targets_BxT), want, rtol=1e-6)
    grad = jax.grad(lambda x: cross_entropy(x, targets_BxT).sum())(logits_BxTxV)
    want_grad = jax.grad(
        lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets_BxT).sum()
    )(logits_BxTxV)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)


@pytest.mark.slow
def test_the_loss_never_holds_float32_logits(tiny_cfg):
    from flaxlm import xla_stats

    trainer = _tpu_trainer(
        tiny_cfg,
        "v5e:2x2",
        "model.vocab_size=32768",
        "model.n_layers=1",
        "data.global_batch_size=4",
        "data.seq_len=1024",
        "model.max_seq_len=1024",
        family="gpt2",
    )
    temporaries = xla_stats.memory_stats(trainer.compile_step())["temporaries"]
    # One sequence per device: its bfloat16 logits are 64 MiB, float32 ones 128 MiB (the loss
    # by gather kept those: 133 MiB of temporaries). Upcast inside the reductions, neither is
    # written whole.
    bf16_logits = 1024 * 32768 * 2
    assert temporaries < bf16_logits


def test_rope_keeps_the_compute_dtype():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.positions import apply_rope

    x_BxTxNxH = jax.random.normal(jax.random.key(0), (2, 64, 4, 16))
    positions_BxT = jnp.broadcast_to(jnp.arange(64) * 97, (2, 64))
    inv_freq_R = 1.0 / (10000.0 ** (jnp.arange(0, 16, 2) / 16))
    want = apply_rope(x_BxTxNxH, positions_BxT, inv_freq_R)
    got = apply_rope(x_BxTxNxH.astype(jnp.bfloat16), positions_BxT, inv_freq_R)
    assert got.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa: the rotation of values ~1 is good to a few 1e-2.
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)
    # The rotation itself is not upcast: no float32 tensor of q's size in the program.
    text = jax.jit(apply_rope).lower(x_BxTxNxH.astype(jnp.bfloat16), positions_BxT, inv_freq_R)
    assert "tensor<2x64x4x16xf32>" not in text.as_text()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_norm_parameters_are_replicated(tiny_cfg, family):
    import jax

    cfg = tiny_cfg("mesh.fsdp=4", "mesh.tensor=2", family=family)
    trainer = Trainer(cfg, make_mesh(cfg))
    shardings = jax.tree_util.tree_flatten_with_path(trainer.state_shardings.params)[0]
    norms = [(p, s) for p, s in shardings if "norm" in jax.tree_util.keystr(p)]
    assert len(norms) >= 2 * cfg.model.n_layers + 1
    for path, sharding in norms:
        assert all(axes is None for axes in sharding.spec), jax.tree_util.keystr(path)
    # The rest of the model is still sharded over FSDP.
    assert any("fsdp" in str(s.spec) for _, s in shardings)


@pytest.mark.parametrize("scan", [False, True])
def test_the_tied_table_is_gathered_once_per_step_not_per_layer(tiny_cfg, scan):
    """GPT-2's embedding table is also its output projection; sharded over FSDP, it must be
    gathered for the step (the forward and, at most, again for the backward), never inside
    the layers' loop or once per layer."""
    trainer = _tpu_trainer(
        tiny_cfg, "v5e:2x2", "model.vocab_size=384", "model.n_layers=6", "model.remat=full",
        f"model.scan_layers={str(scan).lower()}", family="gpt2",
    )  # fmt: skip
    assert trainer.cfg.model.tie_embeddings
    text = trainer.compile_step().as_text()
    table = re.compile(r"= bf16\[384,256\]\S* all-gather(?:-start)?\(.*channel_id=(\d+)")
    gathers = {m.group(1) for m in map(table.search, text.splitlines()) if m}
    assert 1 <= len(gathers) <= 2, gathers


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """The compiled HLO's computations by name: their header (parameters and result types),
    then their instruction lines."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            name = header.group(1)
            comps[name] = [line]
        elif name is not None:
            comps[name].append(line)
    return comps


@pytest.mark.slow
def test_the_chunked_head_is_gathered_once_for_all_chunks(tiny_cfg):
    """With model.logit_chunks the output projection is used inside two loops (the chunks'
    forward and backward passes): its FSDP shards are gathered once before them, never per
    chunk, and its gradient is summed in float32 across the chunks."""
    trainer = _tpu_trainer(
        tiny_cfg, "v5e:2x2", "model.vocab_size=1024", "model.n_layers=1", "model.logit_chunks=4",
        "data.global_batch_size=4", family="llama",
    )  # fmt: skip
    comps = _computations(trainer.compile_step().as_text())
    head = re.compile(r"= bf16\[256,1024\]\S* all-gather(?:-start)?\(.*channel_id=(\d+)")
    gathers = {
        (name, m.group(1)) for name, lines in comps.items() for m in map(head.search, lines) if m
    }
    assert len({channel for _, channel in gathers}) == 1, gathers
    # Everything a while loop runs: its body and what the body calls, transitively.
    callees = {
        name: set(re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", " ".join(lines)))
        for name, lines in comps.items()
    }
    bodies = set(re.findall(r" body=%([\w.\-]+)", "\n".join(map("\n".join, comps.values()))))
    in_loops, todo = set(), list(bodies)
    while todo:
        name = todo.pop()
        if name not in in_loops:
            in_loops.add(name)
            todo.extend(callees.get(name, ()))
    assert not {name for name, _ in gathers} & in_loops
    # A loop carries the head's gradient shard (256 rows over 4 devices: 64) in float32.
    assert any("f32[64,1024]" in comps[b][0] for b in bodies if b in comps), bodies


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_gradient_of_the_logits_is_never_written_whole(tiny_cfg, family):
    """The softmax's backward fuses into the two matmuls of the output head's backward pass,
    so the forward pass's logits are the only buffer of a device's whole logits. With the head
    left sharded over FSDP, XLA computes its gradient as a collective matmul, a loop that
    takes the gradient of the logits as an operand: a second buffer of the logits' size."""
    T, V = 2048, 32768
    trainer = _tpu_trainer(
        tiny_cfg, "v6e:2x4", "model.d_model=1024", "model.d_ff=2048", "model.n_heads=8",
        "model.dtype=bfloat16", "model.n_layers=1", f"model.vocab_size={V}", f"data.seq_len={T}",
        f"model.max_seq_len={T}", "data.global_batch_size=8", "mesh.fsdp=8", family=family,
    )  # fmt: skip
    comps = _computations(trainer.compile_step().as_text())
    entry = next(lines for lines in comps.values() if lines[0].startswith("ENTRY"))
    # One 2048-token sequence per device: logits of (1, 2048, V) or, flattened, (2048, V).
    logits = re.compile(rf"^\s*%\S+ = bf16\[(?:1,)?{T},{V}\]")
    buffers = [line[:160] for line in entry if logits.match(line)]
    assert len(buffers) == 1, buffers
