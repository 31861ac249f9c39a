"""clh-writerd: non-blocking multi-process rotating log files.

Client handlers push records to a local writer daemon over ZeroMQ; the daemon
writes them through concurrent-log-handler, one lock per batch. Without a
daemon the handlers write the file themselves, off the caller's thread.
"""

__version__ = "0.1.0"

from .client.aio import AsyncConcurrentHandler, AsyncLogger, create_async_concurrent_handler  # noqa: E402
from .client.nonblocking import NonBlockingConcurrentHandler, create_nonblocking_handler  # noqa: E402
from .migrate import setup_logging_queues  # noqa: E402

__all__ = [
    "AsyncConcurrentHandler",
    "AsyncLogger",
    "NonBlockingConcurrentHandler",
    "create_async_concurrent_handler",
    "create_nonblocking_handler",
    "setup_logging_queues",
    "__version__",
]
