"""Checkpoints by time as well as by steps: `checkpoint.every_minutes`."""

from __future__ import annotations

import types

from flaxlm import config, hooks


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _hook(clock: _Clock, *overrides: str) -> hooks.Checkpoint:
    cfg = config.load(None, ["train.steps=100", "checkpoint.every_steps=50", *overrides])
    checkpointer = types.SimpleNamespace(every_steps=cfg.checkpoint.every_steps)
    preemption = types.SimpleNamespace(requested=lambda step: False)
    return hooks.Checkpoint(checkpointer, None, None, cfg, preemption, clock=clock)


def test_a_save_is_due_once_the_minutes_have_passed_since_the_last_one():
    clock = _Clock()
    hook = _hook(clock, "checkpoint.every_minutes=2")
    saved = []
    for step in range(1, 101):
        clock.now += 25.0  # a long step: 25 s
        if hook.saves(step):
            saved.append(step)
    # Every 120 s (5 steps), and the step-based saves at 50 and 100 restart the clock.
    assert saved == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100]
    clock.now += 119.0
    assert not hook.saves(101)


def test_without_every_minutes_only_steps_count():
    clock = _Clock()
    hook = _hook(clock)
    saved = []
    for step in range(1, 101):
        clock.now += 3600.0
        if hook.saves(step):
            saved.append(step)
    assert saved == [50, 100]
