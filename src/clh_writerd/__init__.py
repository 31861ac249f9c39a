"""clh-writerd: non-blocking multi-process rotating log files.

Client handlers push records to a local writer daemon over ZeroMQ; the daemon
writes them through concurrent-log-handler, one lock per batch. Without a
daemon the handlers write the file themselves, off the caller's thread.
"""

import sys

from ._version import __version__
from .client._options import HandlerOptions
from .client.nonblocking import NonBlockingConcurrentHandler, create_nonblocking_handler
from .migrate import setup_logging_queues

# The asyncio handler needs Python 3.8+; the thread handler runs on 3.6+
# (clh_writerd._compat). On older Pythons the async names are simply absent.
if sys.version_info >= (3, 8):
    from .client._asynclogger import AsyncLogger
    from .client.aio import AsyncConcurrentHandler, create_async_concurrent_handler

__all__ = [
    "HandlerOptions",
    "NonBlockingConcurrentHandler",
    "create_nonblocking_handler",
    "setup_logging_queues",
    "__version__",
]
if sys.version_info >= (3, 8):
    __all__ += ["AsyncConcurrentHandler", "AsyncLogger", "create_async_concurrent_handler"]
