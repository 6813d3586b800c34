"""Train state and the pure, jit-compiled train and eval steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> sums` are pure
functions; `Trainer` binds them to a model, an optimizer and a mesh, creates the state directly in
its shardings (nothing is ever materialised whole on one host) and compiles the steps with
donated state. The loop that drives them lives in `flaxlm.loop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from flaxlm.config import Arch, Config, NanPolicy
from flaxlm.losses import correct_predictions
from flaxlm.mesh import (
    batch_sharding,
    logical_constraint,
    logical_rules,
    logical_to_sharding,
    replicated,
)
from flaxlm.model import Transformer
from flaxlm.objective import batch_losses, loss_sums
from flaxlm.optim import learning_rate_schedule, make_optimizer

Batch = dict[str, jax.Array]
# Ids below this are single bytes of text (the byte tokenizer); bits per byte counts them.
BYTE_IDS = 256


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # Updates dropped because the loss or the gradients were not finite (train.nan_policy=skip).
    skipped: jax.Array


def _micro_batches(batch: Batch, steps: int) -> Batch:
    """x_BxT -> x_AxBaxT: A = steps micro-batches of Ba = B / A rows, micro-batch i holding
    rows i, i + A, ...

    Strided rather than contiguous rows, so that each micro-batch keeps rows on every device of
    the batch axes (a contiguous split would put micro-batch 0 on the first devices only).
    """

    def split(x_BxT: jax.Array) -> jax.Array:
        b = x_BxT.shape[0]
        x_AxBaxT = x_BxT.reshape(b // steps, steps, *x_BxT.shape[1:]).swapaxes(0, 1)
        return logical_constraint(x_AxBaxT, (None, "batch", None))

    return jax.tree.map(split, batch)


def gradients(
    params,
    model: Transformer,
    batch: Batch,
    z_loss: float,
    accum_steps: int,
    dropout_key: jax.Array | None = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the per-token mean objective, accumulated over micro-batches if asked
    (micro-batch i draws its dropout masks from fold_in(dropout_key, i))."""
    grad_fn = jax.grad(loss_sums, has_aux=True)
    if accum_steps == 1:
        grads, aux = grad_fn(params, model, batch, z_loss, dropout_key)
    else:

        def micro_key(i):
            return None if dropout_key is None else jax.random.fold_in(dropout_key, i)

        def add(carry, micro_i):
            micro, i = micro_i
            grads, aux = grad_fn(params, model, micro, z_loss, micro_key(i))
            return jax.tree.map(jnp.add, carry, (grads, aux)), None

        micro = _micro_batches(batch, accum_steps)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(
            lambda p, b: grad_fn(p, model, b, z_loss, micro_key(0)), params, first
        )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (grads, aux), _ = jax.lax.scan(add, zeros, (micro, jnp.arange(accum_steps)))
    count = jnp.maximum(aux["tokens"], 1.0)
    return jax.tree.map(lambda g: g / count, grads), {**aux, "count": count}


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    z_loss: float = 0.0,
    accum_steps: int = 1,
    skip_nonfinite: bool = False,
    dropout_seed: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    # Dropout masks are a function of (seed, step): a resumed run draws the same ones.
    dropout_key = None
    if dropout_seed is not None:
        dropout_key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
    grads, aux = gradients(state.params, model, batch, z_loss, accum_steps, dropout_key)
    loss = aux["nats"] / aux["count"]
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        # Keep the old params and optimizer state: a bad batch leaves no trace but a count.
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        # Skipped updates do not advance the optimizer's own step count, hence its schedule.
        "learning_rate": schedule(state.step - state.skipped),
        "tokens": aux["tokens"],
        "finite": finite,
        "skipped_steps": skipped,
    }
    if z_loss:
        metrics["z_loss"] = aux["z"] / aux["count"]
    if "correct" in aux:
        metrics["mlm_accuracy"] = aux["correct"] / aux["count"]
    metrics.update({k: v / aux["count"] for k, v in aux.items() if k.startswith("moe_")})
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped)
    return new_state, metrics


def eval_step(params, batch: Batch, *, model: Transformer) -> dict[str, jax.Array]:
    """Sums over the batch: nats of every predicted token, their count, and the bytes among them
    (an encoder's predicted tokens are its masked ones; it also counts those predicted right)."""
    out = batch_losses(params, model, batch)
    losses, weights = out.losses, out.weights
    encoder = model.cfg.arch == Arch.encoder
    targets = batch["labels"] if encoder else batch["tokens"][:, 1:]
    if "bytes" in batch:  # the pipeline says how many bytes of text each token stands for
        nbytes = batch["bytes"] if encoder else batch["bytes"][:, 1:]
        is_byte = nbytes.astype(jnp.float32) * weights
    else:  # byte ids: one byte each
        is_byte = (targets < BYTE_IDS).astype(jnp.float32) * weights
    sums = {"nats": (losses * weights).sum(), "tokens": weights.sum(), "bytes": is_byte.sum()}
    if encoder:
        sums["correct"] = correct_predictions(out.logits, batch, weights)
    return sums


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def optimizer_state_specs(opt_state, params, param_specs):
    """Logical specs for optimizer state: shard each slot like the parameter it belongs to.

    Optax keeps per-parameter slots (Adam's moments, Lion's momentum, Adafactor's factors) in
    subtrees that mirror the parameter tree, so a slot's path ends with its parameter's path. A
    slot with the parameter's shape takes the parameter's spec; anything else (step counts,
    Adafactor's factored row/column statistics) is small and replicated.
    """
    by_path = {
        _path_keys(path): (leaf.shape, spec)
        for (path, leaf), spec in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
            strict=True,
        )
    }
    longest = max((len(p) for p in by_path), default=0)

    def spec_for(path, leaf) -> PartitionSpec:
        keys = _path_keys(path)
        for n in range(min(len(keys), longest), 0, -1):
            match = by_path.get(keys[-n:])
            if match is not None:
                shape, spec = match
                return spec if tuple(shape) == tuple(leaf.shape) else PartitionSpec()
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, opt_state)


def _has_dropout(cfg: Config) -> bool:
    m = cfg.model
    return max(m.dropout_embed, m.dropout_attn, m.dropout_residual) > 0


@dataclasses.dataclass
class Trainer:
    """A model, optimizer and mesh with compiled steps and the shardings of their state."""

    cfg: Config
    mesh: Mesh

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.model = Transformer(cfg.model)
        self.tx = make_optimizer(cfg.optimizer, cfg.train.steps)
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self.rules = logical_rules(cfg)
        self.batch_sharding = batch_sharding(self.mesh, cfg)

        key = jax.random.key(0)
        boxed_params = jax.eval_shape(self._init_params_boxed, key)
        param_specs = nn.get_partition_spec(boxed_params)
        abstract = jax.eval_shape(self._init_state, key)
        self.logical_specs = TrainState(
            step=PartitionSpec(),
            params=param_specs,
            opt_state=optimizer_state_specs(abstract.opt_state, abstract.params, param_specs),
            skipped=PartitionSpec(),
        )
        self.state_shardings: TrainState = logical_to_sharding(self.logical_specs, self.mesh, cfg)
        self.abstract_state: TrainState = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract,
            self.state_shardings,
        )
        replicated_sharding = replicated(self.mesh)
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        step_fn = functools.partial(
            train_step,
            model=self.model,
            tx=self.tx,
            schedule=self.schedule,
            z_loss=cfg.optimizer.z_loss,
            accum_steps=cfg.optimizer.grad_accum_steps,
            skip_nonfinite=cfg.train.nan_policy == NanPolicy.skip,
            dropout_seed=cfg.train.seed if _has_dropout(cfg) else None,
        )
        self._jit_step = jax.jit(
            step_fn,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated_sharding),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            lambda params, batch: eval_step(params, batch, model=self.model),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=replicated_sharding,
        )

    def _init_params_boxed(self, key: jax.Array):
        """Parameters with their logical axis names (nn.Partitioned boxes)."""
        tokens = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
        return self.model.init(key, tokens)["params"]

    def _init_state(self, key: jax.Array) -> TrainState:
        params = nn.meta.unbox(self._init_params_boxed(key))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=self.tx.init(params), skipped=zero)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and the logical rules that activation constraints resolve through."""
        with self.mesh, nn.logical_axis_rules(self.rules):
            yield

    def init_state(self, seed: int) -> TrainState:
        with self.context():
            return self._init(jax.random.key(seed))

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step (jit-compiled `train_step`; the state's buffers are donated)."""
        with self.context():
            return self._jit_step(state, batch)

    def eval_step(self, params, batch: Batch) -> dict[str, jax.Array]:
        with self.context():
            return self._eval_step(params, batch)

    def synthetic_batch(self, seed: int = 0) -> dict[str, np.ndarray]:
        """This process's rows of a batch of random token ids, one document per row: what the
        data pipeline would hand it, for `global_batch`. Measurements of the step alone feed it
        (benchmarks replace the tokens with their own and keep the positions and segments)."""
        cfg = self.cfg
        rows = cfg.data.global_batch_size // jax.process_count()
        rng = np.random.default_rng(seed + jax.process_index())
        tokens = rng.integers(0, cfg.model.vocab_size, (rows, cfg.data.seq_len), dtype=np.int32)
        positions = np.broadcast_to(np.arange(cfg.data.seq_len, dtype=np.int32), tokens.shape)
        batch = {"tokens": tokens, "positions": np.ascontiguousarray(positions)}
        batch["segment_ids"] = np.ones_like(tokens)
        if cfg.model.arch == Arch.encoder:  # a masked-LM batch: labels and their weights
            batch["labels"] = tokens.copy()
            batch["label_weights"] = (rng.random(tokens.shape) < cfg.data.mask_rate).astype(
                np.int32
            )
        return batch

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of one global batch (for ahead-of-time lowering): those
        of `global_batch(synthetic_batch())` and of the pipeline's batches."""
        shape = (self.cfg.data.global_batch_size, self.cfg.data.seq_len)
        return {
            k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for k in ("tokens", "segment_ids", "positions", *self._label_keys())
        }

    def _label_keys(self) -> tuple[str, ...]:
        return ("labels", "label_weights") if self.cfg.model.arch == Arch.encoder else ()

    def lower_step(self, batch: Batch | None = None) -> jax.stages.Lowered:
        """The train step lowered for the abstract state and `batch` (arrays or
        ShapeDtypeStructs; by default the abstract batch of the config), without device work."""
        with self.context():
            return self._jit_step.lower(self.abstract_state, batch or self.abstract_batch())

    def compile_step(
        self, batch: Batch | None = None, compiler_options: dict[str, Any] | None = None
    ) -> jax.stages.Compiled:
        """The train step compiled ahead of time, with XLA `compiler_options` if given."""
        return self.lower_step(batch).compile(compiler_options)

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
        """Assembles this process's slice of the batch into global arrays on the mesh."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()
        }
