"""The typed config tree: schema, YAML composition, command-line overrides and validation.

- `enums`: the choices of config fields and `ConfigError`;
- `schema`: the frozen dataclasses (model, mesh, data, distributed, optimizer, checkpoint,
  train);
- `loading`: YAML files with `defaults:` composition and `key.sub=value` overrides through
  OmegaConf, to/from dicts and YAML;
- `validation`: the checks that need more than types, run by every load before device work.

Everything public is importable from `flaxlm.config` itself.
"""

from flaxlm.config.enums import (
    BYTE_MASK_ID,
    BYTE_VOCAB_SIZE,
    Arch,
    AttentionKernel,
    ConfigError,
    Corpus,
    Decay,
    DistributedInit,
    DType,
    Mlp,
    MoeDispatch,
    NanPolicy,
    Norm,
    Objective,
    OptimizerName,
    Packing,
    Position,
    Remat,
    RopeScaling,
    Router,
    SpikePolicy,
    TokenizerKind,
    WandbMode,
)
from flaxlm.config.loading import (
    from_dict,
    load,
    load_files,
    portable,
    replace,
    to_dict,
    to_yaml,
)
from flaxlm.config.moe import MoeConfig, expert_width, is_sparse_layer
from flaxlm.config.schema import (
    MESH_AXES,
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    SourceConfig,
    TrainConfig,
)
from flaxlm.config.trackers import WandbConfig
from flaxlm.config.validation import check_divisibility, validate

__all__ = [
    "BYTE_MASK_ID",
    "BYTE_VOCAB_SIZE",
    "MESH_AXES",
    "Arch",
    "AttentionKernel",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "Corpus",
    "DType",
    "DataConfig",
    "Decay",
    "DistributedConfig",
    "DistributedInit",
    "MeshConfig",
    "Mlp",
    "ModelConfig",
    "MoeConfig",
    "MoeDispatch",
    "NanPolicy",
    "Norm",
    "Objective",
    "OptimizerConfig",
    "OptimizerName",
    "Packing",
    "Position",
    "Remat",
    "RopeScaling",
    "Router",
    "SourceConfig",
    "SpikePolicy",
    "TokenizerKind",
    "TrainConfig",
    "WandbConfig",
    "WandbMode",
    "check_divisibility",
    "expert_width",
    "from_dict",
    "is_sparse_layer",
    "load",
    "load_files",
    "portable",
    "replace",
    "to_dict",
    "to_yaml",
    "validate",
]
