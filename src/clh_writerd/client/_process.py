"""Process lifecycle shared by both handlers: fork, termination and exit.

Every live handler (thread-based or asyncio) registers here.

- **Fork.** Before ``fork()`` every handler's own threads are parked at a
  safe point (no import, no zmq call, no lock of ours mid-update) and no
  write of a wrapped CLH handler may be in progress; after it the parent's
  threads go on. In the child every handler is marked stale and rebuilds its
  queue, sender and sockets on its next emit(). A child forked while a
  thread of ours held a lock (an import's module lock, say) would otherwise
  wait for it for ever: the thread that holds it does not exist there.
- **Termination.** A child process of ours (forked with live handlers, or a
  multiprocessing child that builds one) gets a SIGTERM handler: it drains
  every handler within its drain_timeout, then does what SIGTERM would have
  done without it (the handler that was there before ours, or the default:
  end the process). ``multiprocessing.Pool``'s ``terminate()`` (what ``with
  Pool()`` does on exit) SIGTERMs its workers with records still queued. An
  app that ignores SIGTERM keeps ignoring it; one that sets its handler
  later (gunicorn) replaces ours and drains through its own graceful exit;
  one whose handler was there first (uvicorn, whose lifespan builds ours)
  has it called after the drain, and its asyncio handlers are left to that
  graceful exit. A SIGTERM that only set CPython's flag (the main thread
  asleep in C) is seen through by ``_sigwatch``.
- **Exit.** At exit (atexit, and multiprocessing's finalizers for children
  that leave through os._exit) every handler is stopped, which drains its
  queue; a process that lost or dropped records says so in one line on
  stderr.
"""

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .._batchwrite import rotating_part
from . import _notices
from ._core import SyncItem
from ._plans import PLANS_LOCK
from ._sigwatch import SigtermWatch

# Anything with .handler (the wrapped CLH handler), .mark_forked(),
# .belongs_here(), .stop(), .park_for_fork(deadline), .resume_after_fork()
# and .stats.
_live: "weakref.WeakSet[Any]" = weakref.WeakSet()
# Every handler's (path, stats) in this process, closed ones included: what
# the exit line reports (a handler closed before exit lost records too).
_accounts: Dict[int, Tuple[str, Any]] = {}
MAX_ACCOUNTS = 1000

# Seconds fork() waits at most for our threads to park and for writes in
# progress to end (a write stuck on another process's file lock must not
# hang fork() for ever).
FORK_WAIT = 2.0
# Locks of ours held across fork() (see _before_fork).
_fork_held: List[Any] = []
# One thread of a forked child rebuilds a handler (WrappingHandler._rebuild_in_child).
CHILD_REBUILD = threading.Lock()
_mp_finalizer: Any = None
_after_bootstrap_registered = False
_previous_sigterm: Any = None  # what SIGTERM did before _on_sigterm
_sigterm_pid = 0  # the process _on_sigterm was installed in (once per process)
_sigterm_ran = 0  # the process it ran in
# Nudges the main thread where a SIGTERM set CPython's flag but our handler
# never ran (see _sigwatch).
_WATCH = SigtermWatch(lambda: _sigterm_ran == os.getpid())
_hooked = False
# The drain under way on a thread, in this process (pid), and what a SIGTERM
# taken during it does once it ends (then).
_drain_here = threading.local()
_exit_reported = False


def register(handler: Any) -> None:
    _install_hooks()
    _live.add(handler)
    _drain_at_multiprocessing_exit()
    if _is_multiprocessing_child():
        _drain_on_sigterm()


class _Bootstrap:
    """What multiprocessing's after-fork registry holds on to (weakly)."""


_BOOTSTRAP = _Bootstrap()


def _after_multiprocessing_bootstrap(_: Any) -> None:
    """A multiprocessing child starting its target (every start method).

    A spawn or forkserver child imports the main module, building a handler
    there, *before* it knows it is a child, and then clears multiprocessing's
    finalizers, ours with them. So: once it knows, drain on SIGTERM, and at
    its exit (a forkserver child leaves through os._exit: no atexit)."""
    if _live:
        _drain_at_multiprocessing_exit()
        _drain_on_sigterm()


def unregister(handler: Any) -> None:
    _live.discard(handler)


def account(handler: Any) -> None:
    """Keep ``handler``'s current stats for the exit line (its per-process
    state was (re)built). Bounded: past MAX_ACCOUNTS, the accounts with
    nothing to report go."""
    if len(_accounts) >= MAX_ACCOUNTS:
        for key, (_, stats) in list(_accounts.items()):
            if not (stats.lost or stats.dropped_count):
                del _accounts[key]
    _accounts[id(handler)] = (handler.path, handler.stats)


# -- fork ----------------------------------------------------------------------
def _before_fork() -> None:
    """Park our threads, then hold the locks a child must find free.

    CLH's thread lock: the child inherits the handler's open file object;
    forked in the middle of a write, it holds the parent's half-written
    buffer and its internal lock in the held state: the child's first write
    then fails ("reentrant call") or blocks forever. Every write (sender and
    synchronous paths) holds CLH's thread lock, so holding it across fork()
    (as logging did before 3.9) means the child gets a clean stream. Our
    module-level locks the same way. Everything is bounded by FORK_WAIT.
    """
    deadline = time.monotonic() + FORK_WAIT
    handlers = list(_live)
    for handler in handlers:
        handler.park_for_fork(deadline)
    locks: List[Any] = [CHILD_REBUILD, SyncItem.lock, PLANS_LOCK]
    locks += [getattr(rotating_part(h.handler), "_thread_lock", None) for h in handlers]
    for lock in locks:
        if lock is not None and lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            _fork_held.append(lock)


def _release_fork_locks() -> None:
    while _fork_held:
        lock = _fork_held.pop()
        try:
            lock.release()
        except RuntimeError:
            pass


def _after_fork_in_parent() -> None:
    _release_fork_locks()
    for handler in list(_live):
        handler.resume_after_fork()


def _after_fork_in_child() -> None:
    global _exit_reported
    _release_fork_locks()
    _WATCH.forget_in_child()
    _exit_reported = False
    _accounts.clear()  # the parent's losses are its own; each handler accounts again as it rebuilds
    handlers = list(_live)
    for handler in handlers:
        handler.mark_forked()  # the next emit() rebuilds it in the child
    if handlers:
        _drain_on_sigterm()


# -- termination -------------------------------------------------------------------
def _is_multiprocessing_child() -> bool:
    """A process started by multiprocessing (spawn, forkserver: no fork hook
    of ours ran in it). Never imports multiprocessing itself. While a spawn
    or forkserver child imports the main module (where apps configure
    logging), it does not know its parent yet; ``_inheriting`` says it is
    being made then."""
    process = sys.modules.get("multiprocessing.process")
    if process is None:
        return False
    if getattr(process.current_process(), "_inheriting", False):
        return True
    parent = getattr(process, "parent_process", None)  # Python 3.8+
    return parent is not None and parent() is not None


def _drain_on_sigterm() -> None:
    """SIGTERM drains our handlers first (from the main thread only, where
    signal handlers are set), then goes where it went before: the handler
    already there (a tool's, such as coverage's, or the app's) or the
    default. Not where SIGTERM is ignored, and once per process: a handler
    set over ours since (coverage's, in a multiprocessing child) calls ours
    when it is done; putting ours over it again would make the two call
    each other. The watch (``_WATCH``) sees that a SIGTERM that only set
    CPython's flag still reaches it."""
    global _previous_sigterm, _sigterm_pid
    try:
        if threading.current_thread() is not threading.main_thread() or _sigterm_pid == os.getpid():
            return
        current = signal.getsignal(signal.SIGTERM)
        if current == signal.SIG_IGN:
            return
        _sigterm_pid = os.getpid()
        if current is not _on_sigterm:  # else inherited from the parent, with what it found there
            _previous_sigterm = current
            signal.signal(signal.SIGTERM, _on_sigterm)
        _WATCH.start()
    except (ValueError, OSError, AttributeError):  # no signals here (another interpreter, Windows)
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    """Drain within each handler's drain_timeout, then do what SIGTERM did
    before ours: the previous handler, or end the process as the default
    would (the same exit status for whoever waits for us). A second SIGTERM
    while draining goes straight there; one that reaches ours again (a
    handler that calls the one it found, which was ours) ends the process.
    One that comes while this thread drains already (an exit's drain, a
    close()) waits for that drain to end: a drain started inside it would
    wait for the locks the interrupted one holds, for ever."""
    global _sigterm_ran
    if _sigterm_ran == os.getpid():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _sigterm_ran = os.getpid()
    previous = _previous_sigterm
    signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
    if getattr(_drain_here, "pid", 0) == os.getpid():
        _drain_here.then.append(lambda: _drain_then_as_before(previous, signum, frame))
        return
    _drain_then_as_before(previous, signum, frame)


def _drain_then_as_before(previous: Any, signum: int, frame: Any) -> None:
    try:
        # An app with its own SIGTERM handler (uvicorn's, set before its
        # lifespan built our handler) shuts down gracefully: an asyncio
        # handler whose loop runs under this signal handler is drained by
        # that shutdown (``async with handler``); stopping it here would send
        # the app's last records to the fallback.
        stop_all(leave_running_loops=callable(previous))
    finally:
        # What SIGTERM did before ours: the handler it found, or the default.
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def draining() -> Iterator[None]:
    """Around every drain (stop_all, each handler's stop()): a SIGTERM
    handled on this thread meanwhile acts once the outermost drain ends."""
    if getattr(_drain_here, "pid", 0) == os.getpid():
        yield
        return
    _drain_here.pid, _drain_here.then = os.getpid(), []
    try:
        yield
    finally:
        then, _drain_here.pid = _drain_here.then, 0
        for action in then:
            action()


# -- exit ------------------------------------------------------------------------------
@draining()
def stop_all(timeout: Optional[float] = None, leave_running_loops: bool = False) -> None:
    """Drain and stop every handler of this process (exit hooks), then say in
    one line on stderr if records were lost or dropped. ``leave_running_loops``:
    not the asyncio handlers whose loop runs on this thread."""
    global _exit_reported
    for handler in list(_live):
        try:
            if leave_running_loops and handler.loop_runs_here():
                continue
            if handler.belongs_here():
                handler.stop(timeout)
        except Exception:
            pass
    losses = [(path, stats.lost, stats.dropped_count, stats.loss_cause)
              for path, stats in list(_accounts.values()) if stats.lost or stats.dropped_count]
    if losses and not _exit_reported:
        _exit_reported = True
        try:
            sys.stderr.write(_notices.exit_line(losses) + "\n")
            sys.stderr.flush()
        except Exception:
            pass


def _drain_at_multiprocessing_exit() -> None:
    """Also drain when a multiprocessing child exits.

    A child started with the 'fork' method (Process or Pool worker) leaves
    through os._exit(): atexit hooks do not run there, multiprocessing's
    finalizers do. The child's registry is cleared when it starts, so this is
    (re)registered by the first handler registered in each process.
    """
    global _mp_finalizer, _after_bootstrap_registered
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None:
        return
    if not _after_bootstrap_registered:
        _after_bootstrap_registered = True
        mp_util.register_after_fork(_BOOTSTRAP, _after_multiprocessing_bootstrap)
    if _mp_finalizer is not None and _mp_finalizer.still_active():
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
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
    atexit.register(stop_all)
