"""Test set-up: 8 CPU devices (set before JAX is imported) and shared small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# XLA's CPU backend compiles with LLVM at -O0: the tests' programs are so small that compiling
# them costs more than running them, and -O0 about halves a compile-bound test.
# It changes code generation only; the HLO (fusion, sharding, collectives) is the same.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process: `devices` CPU devices, compiled fast."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


# Must happen before the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    """One built python-docs corpus for the whole session."""
    from flaxlm.data.corpus import build_python_docs

    cache = tmp_path_factory.mktemp("corpus-cache")
    build_python_docs(cache)
    return str(cache)


@pytest.fixture
def tiny_cfg(corpus_cache, tmp_path):
    """A factory for the tiny GPT-2 config with overrides, writing into tmp_path."""
    from flaxlm import config

    def make(*overrides: str, family: str = "gpt2"):
        model = [] if family == "gpt2" else _llama_overrides()
        return config.load(
            CONFIGS / "tiny.yaml",
            [
                f"data.cache_dir={corpus_cache}",
                f"train.run_dir={tmp_path / 'run'}",
                "train.progress_bar=false",
                "train.tensorboard=false",
                *model,
                *overrides,
            ],
        )

    return make


def _llama_overrides() -> list[str]:
    from omegaconf import OmegaConf

    preset = OmegaConf.load(CONFIGS / "models" / "llama-tiny.yaml")
    return [f"model.{k}={v}" for k, v in preset.model.items()]


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first (a stable sort): with two workers, a long test that
    starts last leaves the other worker idle until it ends."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
