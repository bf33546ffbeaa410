"""Run configuration: the schema, TOML loading with `--set` overrides, errors and generated docs."""

from dittune.config.docs import config_reference_markdown, update_readme_section
from dittune.config.errors import ConfigError, Problem
from dittune.config.load import apply_overrides, load_config, parse_override, resolved_toml, validate_config
from dittune.config.schema import (
    CacheSection,
    CheckpointSection,
    DataSection,
    DittuneConfig,
    LoraSection,
    LossSection,
    ModelSection,
    TrainSection,
    ValidationSection,
)

__all__ = [
    "CacheSection",
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "DittuneConfig",
    "LoraSection",
    "LossSection",
    "ModelSection",
    "Problem",
    "TrainSection",
    "ValidationSection",
    "apply_overrides",
    "config_reference_markdown",
    "load_config",
    "parse_override",
    "resolved_toml",
    "update_readme_section",
    "validate_config",
]
