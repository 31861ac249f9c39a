"""The writer daemon: config, server lifecycle, per-file writers, stats."""

from .config import Config, ConfigError, load_config
from .server import Server, StartupError

__all__ = ["Config", "ConfigError", "Server", "StartupError", "load_config"]
