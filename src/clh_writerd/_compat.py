"""Which parts of the package need which Python.

The thread client (``NonBlockingConcurrentHandler``, ``protocol``,
``_batchwrite`` and the fallback) runs on Python 3.6 and newer, so apps on
RHEL 8 and similar can use it. The daemon and ``AsyncConcurrentHandler`` need
3.8 or newer; importing them on an older Python raises an ImportError that
says so, instead of failing later on a missing feature.
"""

import importlib
import os
import sys
from typing import Any, Callable, Dict

FULL_PYTHON = (3, 8)


def require_full_python(what: str) -> None:
    """Raise ImportError naming ``what`` if this Python is older than 3.8."""
    if sys.version_info < FULL_PYTHON:
        raise ImportError(
            "{} needs Python {}.{} or newer (this is {}.{}); on older Pythons clh-writerd offers "
            "NonBlockingConcurrentHandler, talking to a daemon that runs on a newer Python".format(
                what, FULL_PYTHON[0], FULL_PYTHON[1], sys.version_info[0], sys.version_info[1]))


def unsupported_platform(part: str) -> str:
    """Why ``part`` ("daemon" or "handler") cannot run here, or "".

    The daemon needs Linux: it identifies its ipc peers by the kernel's
    credentials (SO_PEERCRED through libzmq) and checks files with /proc
    and Linux-only flags. The handlers need POSIX: the thread handler's
    sender waits on a pipe with the sockets (zmq polls sockets only on
    Windows), and the fork and lock handling are POSIX. Linux is what the
    test suite runs on; macOS is POSIX but not tested.
    """
    if part == "daemon" and not sys.platform.startswith("linux"):
        return (f"the clh-writerd daemon runs on Linux only (this is {sys.platform}): it identifies its clients by "
                "the kernel's peer credentials. Apps on this system can use the handlers with endpoint=None")
    if part == "handler" and os.name != "posix":
        return (f"clh-writerd's handlers need a POSIX system (Linux, tested; macOS, untested), not {sys.platform}: "
                "use concurrent_log_handler.ConcurrentRotatingFileHandler directly here")
    return ""


def lazy_names(package: str, public: Dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``: a public name is
    imported from the module ``public`` gives for it when first used, then
    kept as a plain attribute of the package."""

    def __getattr__(name: str) -> Any:
        module = public.get(name)
        if module is None:
            raise AttributeError("module {!r} has no attribute {!r}".format(package, name))
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    return __getattr__
