"""Configuration: the schema (dataclasses with one-line field docs), loading and overrides, validation."""
from dsmoe.config.load import config_from_tree, dump_yaml, from_dict, help_text, load_config, load_yaml_tree, parse_overrides
from dsmoe.config.schema import (CONFIG_ROOT, MODEL_SECTIONS, REPO_ROOT, SECTIONS, AttentionConfig, CheckpointConfig,
                                 Config, ConfigError, DataConfig, FaultConfig, GuardConfig, LogConfig, ModelConfig,
                                 MoEConfig, ParallelConfig, RunConfig, TrainConfig)
from dsmoe.config.validate import validate, validate_training

__all__ = ["CONFIG_ROOT", "MODEL_SECTIONS", "REPO_ROOT", "SECTIONS", "AttentionConfig", "CheckpointConfig", "Config",
           "ConfigError", "DataConfig", "FaultConfig", "GuardConfig", "LogConfig", "ModelConfig", "MoEConfig",
           "ParallelConfig", "RunConfig", "TrainConfig", "config_from_tree", "dump_yaml", "from_dict", "help_text", "load_config",
           "load_yaml_tree", "parse_overrides", "validate", "validate_training"]
