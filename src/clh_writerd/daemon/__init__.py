"""The writer daemon: config, server lifecycle, per-file writers, stats."""

from .._compat import require_full_python

require_full_python("the clh-writerd daemon")

from .config import Config, ConfigError, load_config  # noqa: E402
from .server import Server, StartupError  # noqa: E402

__all__ = ["Config", "ConfigError", "Server", "StartupError", "load_config"]
