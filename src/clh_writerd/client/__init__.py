"""Client side: what application processes use to reach the daemon."""

from .control import DaemonUnavailable, request

__all__ = ["DaemonUnavailable", "request"]
