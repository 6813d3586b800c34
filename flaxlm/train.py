"""Train state and the pure, jit-compiled train and eval steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> sums` are pure
functions; `Trainer` binds them to a model, an optimizer and a mesh, creates the state directly in
its shardings (nothing is ever materialised whole on one host) and compiles the steps with
donated state. The loop that drives them lives in `flaxlm.loop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from flaxlm import mesh as mesh_lib
from flaxlm.config import Config
from flaxlm.model import Transformer
from flaxlm.optim import learning_rate_schedule, make_optimizer

Batch = dict[str, jax.Array]
# Ids below this are single bytes of text (the byte tokenizer); bits per byte counts them.
BYTE_IDS = 256


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def token_losses(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-token next-token cross entropy (B, T-1) and its weights.

    Position t predicts token t+1 when both lie in the same (non-padding) segment, so a packed
    row never trains on predicting the first token of the next document.
    """
    tokens, segments = batch["tokens"], batch["segment_ids"]
    targets = tokens[:, 1:]
    weights = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    return losses, weights.astype(jnp.float32)


def loss_fn(params, model: Transformer, batch: Batch) -> tuple[jax.Array, jax.Array]:
    logits = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    losses, weights = token_losses(logits, batch)
    count = jnp.maximum(weights.sum(), 1.0)
    return (losses * weights).sum() / count, count


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, model, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
        "tokens": count,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, model: Transformer) -> dict[str, jax.Array]:
    """Sums over the batch: nats of every predicted token, their count, and the bytes among them."""
    logits = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    losses, weights = token_losses(logits, batch)
    is_byte = (batch["tokens"][:, 1:] < BYTE_IDS).astype(jnp.float32) * weights
    return {
        "nats": (losses * weights).sum(),
        "tokens": weights.sum(),
        "bytes": is_byte.sum(),
    }


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
        self.rules = mesh_lib.logical_rules(cfg)
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh, cfg)

        abstract_boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        self.logical_specs = nn.get_partition_spec(abstract_boxed)
        self.state_shardings: TrainState = mesh_lib.logical_to_sharding(
            self.logical_specs, self.mesh, cfg
        )
        self.abstract_state: TrainState = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.meta.unbox(abstract_boxed),
            self.state_shardings,
        )
        replicated = mesh_lib.replicated(self.mesh)
        self._init = jax.jit(
            lambda key: nn.meta.unbox(self._init_boxed(key)), out_shardings=self.state_shardings
        )
        self._train_step = jax.jit(
            lambda state, batch: train_step(
                state, batch, model=self.model, tx=self.tx, schedule=self.schedule
            ),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            lambda params, batch: eval_step(params, batch, model=self.model),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=replicated,
        )

    def _init_boxed(self, key: jax.Array) -> TrainState:
        seq = self.cfg.data.seq_len
        tokens = jnp.zeros((1, seq), jnp.int32)
        params = self.model.init(key, tokens)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params)
        )

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and the logical rules that activation constraints resolve through."""
        with self.mesh, nn.logical_axis_rules(self.rules):
            yield

    def init_state(self, seed: int) -> TrainState:
        with self.context():
            return self._init(jax.random.key(seed))

    def train_step(
        self, state: TrainState, batch: Batch
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        with self.context():
            return self._train_step(state, batch)

    def eval_step(self, params, batch: Batch) -> dict[str, jax.Array]:
        with self.context():
            return self._eval_step(params, batch)

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
        """Assembles this process's slice of the batch into global arrays on the mesh."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()
        }


def evaluate(trainer: Trainer, params, batches) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte over an iterable of process-local batches."""
    nats = tokens = nbytes = 0.0
    for local in batches:
        sums = jax.device_get(trainer.eval_step(params, trainer.global_batch(local)))
        nats += float(sums["nats"])
        tokens += float(sums["tokens"])
        nbytes += float(sums["bytes"])
    loss = nats / max(tokens, 1.0)
    return {
        "loss": loss,
        "perplexity": float(np.exp(min(loss, 700.0))),
        "bits_per_byte": nats / np.log(2.0) / max(nbytes, 1.0),
        "tokens": int(tokens),
    }
