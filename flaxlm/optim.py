"""Optimizer and learning-rate schedule from `OptimizerConfig` (optax).

AdamW with linear warmup then cosine decay (or a constant rate), global-norm clipping, and weight
decay on matrices only (not on biases or norm scales, whose scale is not a capacity knob).
"""

from __future__ import annotations

import jax
import optax

from flaxlm.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.decay == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            cfg.learning_rate,
            decay_steps=max(total_steps - cfg.warmup_steps, 1),
            alpha=cfg.min_lr_ratio,
        )
    return optax.join_schedules([warmup, after], boundaries=[cfg.warmup_steps])


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=_decay_mask,
    )
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw
