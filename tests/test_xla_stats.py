"""XLA's memory and cost analysis of a compiled program, and the table of accelerator chips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from flaxlm import xla_stats
from flaxlm.flops import TPU_GENERATIONS, find_chip


def test_memory_and_cost_of_a_compiled_matmul():
    compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((64, 64), jnp.float32)).compile()
    memory = xla_stats.memory_stats(compiled)
    assert memory["arguments"] == memory["outputs"] == 64 * 64 * 4
    assert memory["live"] == memory["arguments"] + memory["outputs"] + memory["temporaries"]
    cost = xla_stats.cost_stats(compiled)
    assert cost["flops"] == pytest.approx(2 * 64**3)
    assert cost["bytes_accessed"] > 0
    assert set(cost) <= {"flops", "bytes_accessed", "optimal_seconds"}


def test_chips_by_generation_and_by_device_kind():
    assert TPU_GENERATIONS == ("v4", "v5e", "v5p", "v6e")
    # The more specific kinds win over "TPU v5", which names the v5p.
    assert find_chip("TPU v5 lite").generation == "v5e"
    assert find_chip("TPU v5").generation == "v5p"
    assert find_chip("v5p") is find_chip("TPU v5p")
    assert find_chip("NVIDIA H100 80GB HBM3").peak_flops == 989e12
    assert find_chip("TPU v2") is None
    # v4 in a topology description: two devices per chip share its peak and its HBM.
    assert find_chip("v4").per_device(2.0) == (275e12 / 2, 16)
    assert find_chip("v5e").per_device() == (197e12, 16)
