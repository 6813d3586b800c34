"""Optimizers and learning-rate schedules from `OptimizerConfig` (optax).

Optimizers: AdamW, Adafactor and Lion, each behind global-norm clipping, with weight decay on
matrices only (not on biases or norm scales, whose scale is not a capacity knob). Schedules:
linear warmup, then cosine or linear decay to `min_lr_ratio` x peak, warmup-stable-decay (constant,
then a linear decay over the last `decay_fraction` of the steps), or constant. The schedule
spans `optimizer.decay_steps` steps when set (a resumed run keeps its horizon), else the run's
`train.steps`; past its horizon it stays at its floor.
"""

from __future__ import annotations

import jax
import optax

from flaxlm.config import Decay, OptimizerConfig, OptimizerName


def horizon(cfg: OptimizerConfig, train_steps: int) -> int:
    """The step at which the schedule reaches its floor: decay_steps, else train.steps."""
    return cfg.decay_steps if cfg.decay_steps is not None else train_steps


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    total_steps = horizon(cfg, total_steps)
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    after_warmup = max(total_steps - cfg.warmup_steps, 1)
    if cfg.decay == Decay.constant:
        after = optax.constant_schedule(peak)
    elif cfg.decay == Decay.cosine:
        after = optax.cosine_decay_schedule(peak, after_warmup, alpha=cfg.min_lr_ratio)
    elif cfg.decay == Decay.linear:
        after = optax.linear_schedule(peak, floor, after_warmup)
    else:  # warmup-stable-decay
        decay_steps = max(round(total_steps * cfg.decay_fraction), 1)
        stable_steps = max(after_warmup - decay_steps, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)],
            boundaries=[stable_steps],
        )
    return optax.join_schedules([warmup, after], boundaries=[cfg.warmup_steps])


def _decay_mask(params):
    """True for weight matrices and embedding tables, by name: not for biases or norm scales,
    whatever their rank (per-head biases are 2-D, scanned layers add an axis to everything)."""

    def is_matrix(path, _) -> bool:
        last = path[-1]
        return str(getattr(last, "key", getattr(last, "name", last))) in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.name == OptimizerName.adamw:
        opt = optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    elif cfg.name == OptimizerName.lion:
        opt = optax.lion(
            schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask
        )
    else:
        # T5-style Adafactor: factored second moments, relative step sizes off (the schedule
        # gives the absolute rate), update clipping left to the global-norm clip below.
        opt = optax.adafactor(
            schedule,
            multiply_by_parameter_scale=False,
            clipping_threshold=None,
            momentum=cfg.b1 if cfg.b1 > 0 else None,
            weight_decay_rate=cfg.weight_decay or None,
            weight_decay_mask=_decay_mask,
        )
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
    return opt
