"""clh-writerd: non-blocking multi-process rotating log files.

Client handlers push records to a local writer daemon over ZeroMQ; the daemon
writes them through concurrent-log-handler, one lock per batch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
