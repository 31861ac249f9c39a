"""Errors shared by the daemon's modules (a leaf: imports nothing of ours)."""


class StartupError(RuntimeError):
    """The daemon cannot start (socket, lock, directories, metrics)."""
