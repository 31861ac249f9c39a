"""clh-writerd: non-blocking multi-process rotating log files.

Client handlers push records to a local writer daemon over ZeroMQ; the daemon
writes them through concurrent-log-handler, one lock per batch. Without a
daemon the handlers write the file themselves, off the caller's thread.

The public names are loaded when first used (PEP 562): the daemon
(``python -m clh_writerd``) never imports the handlers, and an app that uses
only the thread handler never imports asyncio's. The module that defines a
name is imported completely, on the caller's thread, before any handler
thread of ours exists (no thread of ours imports lazily: see
``client/_process.py``).
"""

import sys
from typing import Any, Dict

from ._compat import lazy_names
from ._version import __version__

# name -> the module that defines it.
_PUBLIC: Dict[str, str] = {
    "HandlerOptions": ".client._options",
    "NonBlockingConcurrentHandler": ".client.nonblocking",
    "create_nonblocking_handler": ".client.nonblocking",
    "setup_logging_queues": ".migrate",
}
# The asyncio handler needs Python 3.8+; the thread handler runs on 3.6+
# (clh_writerd._compat). On older Pythons the async names are simply absent.
if sys.version_info >= (3, 8):
    _PUBLIC.update({
        "AsyncLogger": ".client._asynclogger",
        "AsyncConcurrentHandler": ".client.aio",
        "create_async_concurrent_handler": ".client.aio",
    })

__all__ = sorted(_PUBLIC) + ["__version__"]


__getattr__ = lazy_names(__name__, _PUBLIC)


def __dir__() -> Any:
    return sorted(set(__all__) | {"__version__"})


if sys.version_info < (3, 7):  # no module __getattr__ (PEP 562) before 3.7: load them now
    for _name in _PUBLIC:
        globals()[_name] = __getattr__(_name)
