"""The package version, in a leaf module so the daemon can read it without
importing the client handlers (and their zmq.asyncio, fork and exit hooks)."""

__version__ = "0.1.0"
