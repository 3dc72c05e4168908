"""Run configuration: typed dataclasses (:mod:`.schema`) loaded strictly from YAML with dotted
command-line overrides (:mod:`.loading`). Constructing the dataclasses directly runs the same checks.
"""
from rdprune.config.loading import (
    config_from_dict,
    config_hash,
    config_to_dict,
    config_to_yaml,
    load_config,
    read_yaml,
    save_config,
)
from rdprune.config.schema import (
    SECTIONS,
    CalibrationConfig,
    Config,
    DataConfig,
    DistributedConfig,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    PruneConfig,
    RunConfig,
    TrainingConfig,
    config_reference,
    field_docs,
)
from rdprune.config.values import ConfigError

__all__ = [
    "SECTIONS", "CalibrationConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig",
    "FinetuneConfig", "ModelConfig", "PretrainConfig", "PruneConfig", "RunConfig", "TrainingConfig",
    "config_from_dict", "config_hash", "config_reference", "config_to_dict", "config_to_yaml",
    "field_docs", "load_config", "read_yaml", "save_config",
]
