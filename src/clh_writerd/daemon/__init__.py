"""The writer daemon: config, server lifecycle, per-file writers, stats.

The public names load when first used (PEP 562), so that importing one
module of the package (``python -m clh_writerd.daemon.config``, a test of
the config) does not start with the server's.
"""

import importlib
from typing import Any, Dict

from .._compat import require_full_python

require_full_python("the clh-writerd daemon")

# name -> the module that defines it.
_PUBLIC: Dict[str, str] = {
    "Config": ".config", "ConfigError": ".config", "load_config": ".config",
    "Server": ".server", "StartupError": ".server",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
