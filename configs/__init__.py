"""The configuration tree (pydantic, no torch) and its loader."""

from .load import ConfigError, UserError, dump_config, load_config, parse_override, validate
from .actors import EMBEDDED_MODEL
from .schema import Config

__all__ = ["Config", "ConfigError", "EMBEDDED_MODEL", "UserError", "dump_config", "load_config", "parse_override", "validate"]
