"""Process lifecycle shared by both handlers: fork and exit hooks.

Every live handler (thread-based or asyncio) registers here. At fork, no
write of a wrapped CLH handler may be in progress; in the child every handler
is marked stale and rebuilds its queue, sender and sockets on its next
emit(). At exit (atexit, and multiprocessing's finalizers for children that
leave through os._exit) every handler is stopped, which drains its queue.
"""

import atexit
import os
import sys
import weakref
from typing import Any, List

from .._batchwrite import rotating_part

# Anything with .handler (the wrapped CLH handler), .mark_forked(),
# .belongs_here() and .stop().
_live: "weakref.WeakSet[Any]" = weakref.WeakSet()

# Wrapped handlers' write locks held across fork() (see _before_fork).
_FORK_LOCK_TIMEOUT = 5.0
_fork_held: List[Any] = []
_mp_finalizer: Any = None


_hooked = False


def register(handler: Any) -> None:
    _install_hooks()
    _live.add(handler)
    _drain_at_multiprocessing_exit()


def unregister(handler: Any) -> None:
    _live.discard(handler)


def _before_fork() -> None:
    """Let no thread be inside a write of a wrapped CLH handler when we fork.

    The child inherits the handler's open file object; forked in the middle of
    a write, it holds the parent's half-written buffer and its internal lock in
    the held state: the child's first write then fails ("reentrant call") or
    blocks forever. Every write (sender and synchronous paths) holds CLH's
    thread lock, so holding it across fork() (as logging did before 3.9) means
    the child gets a clean stream. Bounded: a write stuck on another process's
    file lock must not hang fork() forever.
    """
    for handler in list(_live):
        lock = getattr(rotating_part(handler.handler), "_thread_lock", None)
        if lock is not None and lock.acquire(timeout=_FORK_LOCK_TIMEOUT):
            _fork_held.append(lock)


def _release_fork_locks() -> None:
    while _fork_held:
        lock = _fork_held.pop()
        try:
            lock.release()
        except RuntimeError:
            pass


def _after_fork_in_child() -> None:
    _release_fork_locks()
    for handler in list(_live):
        handler.mark_forked()  # the next emit() rebuilds it in the child


def stop_all() -> None:
    """Drain and stop every handler of this process (exit hooks)."""
    for handler in list(_live):
        try:
            if handler.belongs_here():
                handler.stop()
        except Exception:
            pass


def _drain_at_multiprocessing_exit() -> None:
    """Also drain when a multiprocessing child exits.

    A child started with the 'fork' method (Process or Pool worker) leaves
    through os._exit(): atexit hooks do not run there, multiprocessing's
    finalizers do. The child's registry is cleared when it starts, so this is
    (re)registered by the first handler registered in each process.
    """
    global _mp_finalizer
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None or (_mp_finalizer is not None and _mp_finalizer.still_active()):
        return
    # Lowest priority: runs after other finalizers, which may still log.
    _mp_finalizer = mp_util.Finalize(None, stop_all, exitpriority=-100)


def _install_hooks() -> None:
    """Fork and exit hooks, once, when the first handler registers (a process
    that only imports the package, such as the daemon, gets none)."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_parent=_release_fork_locks,
                            after_in_child=_after_fork_in_child)
    atexit.register(stop_all)
