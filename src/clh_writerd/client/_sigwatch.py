"""The SIGTERM watch: a SIGTERM whose Python handler would never run.

CPython runs a Python signal handler on the main thread only, between two
bytecodes or when a blocking call there returns EINTR. A SIGTERM taken by
another thread, or by the main thread just before it blocks in C (a pool
worker on its way into ``sem_wait`` for its next task), only sets CPython's
flag: the main thread sleeps on, our handler (which drains, then ends the
process) never runs, and ``with Pool()``, which waits for its workers,
waits for ever. Measured: 1 exit in ~100 of a forkserver ``Pool(4)`` with
our handler, with or without coverage, on the 2-core machine. With SIG_DFL
the kernel ends the process itself, so there was no such race before a
Python handler was set.

The watch learns of each SIGTERM through ``signal.set_wakeup_fd`` (CPython's
C handler writes the signal's number there, from whichever thread took it)
and, until our handler has run, nudges the main thread a few times with
SIGURG, whose handler does nothing: the blocked call returns EINTR, CPython
runs every pending handler, ours included, and resumes the call (PEP 475).
SIGURG is ignored by default and rarely used, which is why the Go runtime
preempts its threads with it too. A nudge that comes when nothing is stuck
costs one interrupted and resumed system call.

Where it stays out: a process whose wakeup fd is someone else's (an asyncio
loop's, which already wakes its main thread), whose SIGURG has a disposition
of its own, or with no ``pthread_kill`` (Windows).
"""

import os
import signal
import threading
import time
from typing import Callable, Optional, Tuple

# Pauses before each nudge, from the SIGTERM: enough for a slow handler above
# ours (coverage's saves its data first) and bounded where ours never runs
# (gunicorn replaces it, and its own handler ends the worker).
NUDGE_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def _nothing(signum: int, frame: object) -> None:
    """SIGURG's handler: only there so that a nudge interrupts the main thread."""


class SigtermWatch:
    """One per process (``start()`` from the main thread, where signals are
    set). Its thread sleeps in ``os.read`` or ``time.sleep``, holding no lock
    across a fork(); the child forgets the parent's pipe (``forget_in_child``)
    and starts its own watch if it drains on SIGTERM."""

    def __init__(self, handled: Callable[[], bool]) -> None:
        self._handled = handled  # our SIGTERM handler has run in this process
        self._pipe: Optional[Tuple[int, int]] = None
        self._main = 0
        self._nudge = int(getattr(signal, "SIGURG", 0))

    def start(self) -> None:
        """Watch this process's SIGTERMs (idempotent; main thread only)."""
        if self._pipe is not None or not self._nudge or not hasattr(signal, "pthread_kill"):
            return
        if signal.getsignal(self._nudge) not in (signal.SIG_DFL, _nothing):
            return
        read, write = os.pipe()
        os.set_blocking(write, False)  # set_wakeup_fd's requirement: a signal never blocks on it
        old = _set_wakeup_fd(write)
        if old != -1:  # someone else's: put it back
            _set_wakeup_fd(old)
            os.close(read)
            os.close(write)
            return
        signal.signal(self._nudge, _nothing)
        self._pipe = (read, write)
        self._main = threading.main_thread().ident or 0
        threading.Thread(target=self._run, args=(read,), name="clh-writerd-sigterm", daemon=True).start()

    def forget_in_child(self) -> None:
        """In a forked child (its only thread, the main one): the parent's
        pipe is not ours to watch, nor to write this process's signals to."""
        if self._pipe is None:
            return
        read, write = self._pipe
        self._pipe = None
        try:
            old = _set_wakeup_fd(-1)
            if old != write:
                _set_wakeup_fd(old)
        except ValueError:  # not the main thread: leave the wakeup fd as it is
            return
        os.close(read)
        os.close(write)

    def _run(self, read: int) -> None:
        while True:
            try:
                numbers = os.read(read, 512)
            except OSError:
                return
            if not numbers:
                return
            if signal.SIGTERM in numbers:
                self._nudge_main()

    def _nudge_main(self) -> None:
        for pause in NUDGE_PAUSES:
            time.sleep(pause)
            if self._handled():
                return
            try:
                signal.pthread_kill(self._main, self._nudge)
            except (OSError, ValueError):  # the main thread is gone: the process is ending
                return


def _set_wakeup_fd(fd: int) -> int:
    try:
        return signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    except TypeError:  # Python 3.6
        return signal.set_wakeup_fd(fd)
