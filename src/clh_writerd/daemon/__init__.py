"""The writer daemon: config, server lifecycle, per-file writers, stats.

The public names load when first used (PEP 562), so that importing one
module of the package (``python -m clh_writerd.daemon.config``, a test of
the config) does not start with the server's.
"""

from typing import Dict

from .._compat import lazy_names, require_full_python

require_full_python("the clh-writerd daemon")

# name -> the module that defines it.
_PUBLIC: Dict[str, str] = {
    "Config": ".config", "ConfigError": ".config", "load_config": ".config",
    "Server": ".server", "StartupError": ".server",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_names(__name__, _PUBLIC)
