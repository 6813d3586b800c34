"""Config loading, composition, overrides and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONFIGS

from flaxlm import config
from flaxlm.config import ConfigError, Corpus, DType, Mlp, Norm, Packing, Position, TokenizerKind
from flaxlm.mesh import resolve_shape


def test_composition_merges_base_preset_and_experiment():
    cfg = config.load(CONFIGS / "tiny.yaml")
    assert cfg.model.d_model == 64  # from models/gpt2-tiny.yaml
    assert cfg.optimizer.b2 == 0.95  # from base.yaml
    assert cfg.data.seq_len == 64  # from tiny.yaml itself, overriding base.yaml's 256
    assert cfg.model.norm is Norm.layernorm and cfg.model.position is Position.learned


def test_overrides_are_typed_and_win():
    cfg = config.load(
        CONFIGS / "tiny.yaml", ["model.n_layers=3", "model.mlp=swiglu", "train.steps=7"]
    )
    assert cfg.model.n_layers == 3 and cfg.model.mlp is Mlp.swiglu and cfg.train.steps == 7


def test_misspelled_key_is_named():
    with pytest.raises(ConfigError, match=r"model\.n_layer"):
        config.load(CONFIGS / "tiny.yaml", ["model.n_layer=3"])


def test_misspelled_key_in_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"defaults: [{CONFIGS / 'tiny.yaml'}]\noptimizer:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rat"):
        config.load(bad)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        config.load(CONFIGS / "tiny.yaml", ["model.d_model=big"])


def test_bad_enum_value_is_named():
    with pytest.raises(ConfigError, match=r"model\.position"):
        config.load(CONFIGS / "tiny.yaml", ["model.position=absolute"])


def test_mesh_that_does_not_match_devices():
    cfg = config.load(CONFIGS / "tiny.yaml", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"])
    with pytest.raises(ConfigError, match=r"data=2 x fsdp=2 x tensor=1 has 4 devices but 8"):
        resolve_shape(cfg.mesh, 8)


def test_mesh_fill_axis():
    cfg = config.load(CONFIGS / "tiny.yaml", ["mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2"])
    assert resolve_shape(cfg.mesh, 8) == {
        "data": 2,
        "fsdp": 2,
        "context": 1,
        "tensor": 2,
        "expert": 1,
    }
    four_way = config.load(CONFIGS / "tiny.yaml", ["mesh.data=4", "mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match="does not divide 6"):
        resolve_shape(four_way.mesh, 6)


def test_mesh_must_divide_dimensions():
    with pytest.raises(ConfigError, match=r"mesh\.tensor=3 does not divide model\.n_heads=4"):
        config.load(CONFIGS / "tiny.yaml", ["mesh.tensor=3", "mesh.fsdp=1", "model.vocab_size=321"])


def test_impossible_model_combinations():
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads=3 does not divide model\.n_heads=4"):
        config.load(CONFIGS / "tiny.yaml", ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"data\.seq_len=128 exceeds model\.max_seq_len=64"):
        config.load(CONFIGS / "tiny.yaml", ["data.seq_len=128"])
    with pytest.raises(ConfigError, match=r"model\.vocab_size=100"):
        config.load(CONFIGS / "tiny.yaml", ["model.vocab_size=100"])
    with pytest.raises(ConfigError, match=r"rope_scaling=yarn .* set model\.position=rope"):
        config.load(CONFIGS / "tiny.yaml", ["model.rope_scaling=yarn"])  # learned positions
    rope = ["model.position=rope", "model.rope_scaling=linear"]
    with pytest.raises(ConfigError, match=r"rope_scaling_factor=0\.5 must be >= 1"):
        config.load(CONFIGS / "tiny.yaml", [*rope, "model.rope_scaling_factor=0.5"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        config.load(CONFIGS / "tiny.yaml", ["model.d_model"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults: [b.yaml]\n")
    b.write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        config.load(a)


def test_yaml_round_trip(tmp_path):
    cfg = config.load(CONFIGS / "tiny.yaml", ["model.position=rope", "mesh.rules.embed=[]"])
    path = tmp_path / "saved.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(path) == cfg


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {"base.yaml", "tiny.yaml", "quickstart.yaml"} <= {f.name for f in files}
    for path in files:
        config.load(path)


def test_choices_are_enums_spelled_as_in_yaml():
    import jax.numpy as jnp

    cfg = config.load(CONFIGS / "tiny.yaml", ["data.packing=concat", "model.dtype=bfloat16"])
    assert cfg.data.corpus is Corpus.python_docs and cfg.data.tokenizer is TokenizerKind.byte
    assert cfg.data.packing is Packing.concat and cfg.model.dtype is DType.bfloat16
    # str enums: existing comparisons, f-strings and dtype look-ups see the YAML spelling.
    assert cfg.data.corpus == "python-docs" and f"{cfg.data.corpus}" == "python-docs"
    assert jnp.dtype(cfg.model.dtype) == jnp.bfloat16
    saved = config.to_dict(cfg)
    assert saved["data"]["corpus"] == "python-docs" and saved["model"]["dtype"] == "bfloat16"
    assert "corpus: python-docs" in config.to_yaml(cfg)
    assert config.from_dict(saved) == cfg


@pytest.mark.parametrize(
    "override, choices",
    [
        ("data.corpus=pyhton-docs", "python-docs, files, tfds, mixture"),
        ("data.tokenizer=sp", "byte, sentencepiece, hf"),
        ("data.packing=pack", "documents, concat"),
        ("model.dtype=float8", "float32, bfloat16, float16"),
        ("model.param_dtype=fp32", "float32, bfloat16, float16"),
    ],
)
def test_a_bad_choice_names_the_key_the_value_and_the_choices(override, choices):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as error:
        config.load(CONFIGS / "tiny.yaml", [override])
    message = str(error.value)
    assert key in message and f"'{value}'" in message and choices in message


def test_a_bad_choice_made_in_code_is_named():
    cfg = config.load(CONFIGS / "tiny.yaml")
    with pytest.raises(ConfigError, match=r"model\.dtype='float8' is not one of float32, bf"):
        config.replace(cfg, model={"dtype": "float8"})
    nested = ["data.corpus=mixture", "data.mixture=[{corpus: mixture}]"]
    with pytest.raises(ConfigError, match=r"data\.mixture\[0\]\.corpus='mixture' is not"):
        config.load(CONFIGS / "tiny.yaml", nested)


def test_the_config_package_imports_nothing_else_from_flaxlm():
    import ast

    package = Path(config.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                # `from flaxlm import data` imports flaxlm.data.
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                outside = name.startswith("flaxlm.") and not name.startswith("flaxlm.config.")
                assert not outside, f"{path.name} imports {name}"


def test_checkpoint_host_memory_must_be_a_whole_positive_gb():
    with pytest.raises(ConfigError, match=r"checkpoint\.host_memory_gb=0 must be at least 1"):
        config.load(CONFIGS / "tiny.yaml", ["checkpoint.host_memory_gb=0"])
    assert (
        config.load(
            CONFIGS / "tiny.yaml", ["checkpoint.host_memory_gb=2"]
        ).checkpoint.host_memory_gb
        == 2
    )
