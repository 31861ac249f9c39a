"""clh-writerd: non-blocking multi-process rotating log files.

Client handlers push records to a local writer daemon over ZeroMQ; the daemon
writes them through concurrent-log-handler, one lock per batch. Without a
daemon the handlers write the file themselves, off the caller's thread.
"""

from ._version import __version__
from .client.aio import AsyncConcurrentHandler, create_async_concurrent_handler
from .client._asynclogger import AsyncLogger
from .client._options import HandlerOptions
from .client.nonblocking import NonBlockingConcurrentHandler, create_nonblocking_handler
from .migrate import setup_logging_queues

__all__ = [
    "AsyncConcurrentHandler",
    "AsyncLogger",
    "HandlerOptions",
    "NonBlockingConcurrentHandler",
    "create_async_concurrent_handler",
    "create_nonblocking_handler",
    "setup_logging_queues",
    "__version__",
]
