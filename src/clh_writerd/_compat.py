"""Which parts of the package need which Python.

The thread client (``NonBlockingConcurrentHandler``, ``protocol``,
``_batchwrite`` and the fallback) runs on Python 3.6 and newer, so apps on
RHEL 8 and similar can use it. The daemon and ``AsyncConcurrentHandler`` need
3.8 or newer; importing them on an older Python raises an ImportError that
says so, instead of failing later on a missing feature.
"""

import sys

FULL_PYTHON = (3, 8)


def require_full_python(what: str) -> None:
    """Raise ImportError naming ``what`` if this Python is older than 3.8."""
    if sys.version_info < FULL_PYTHON:
        raise ImportError(
            "{} needs Python {}.{} or newer (this is {}.{}); on older Pythons clh-writerd offers "
            "NonBlockingConcurrentHandler, talking to a daemon that runs on a newer Python".format(
                what, FULL_PYTHON[0], FULL_PYTHON[1], sys.version_info[0], sys.version_info[1]))
