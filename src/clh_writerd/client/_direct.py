"""Writes that do not go through the batch window: the fallback (the wrapped
CLH handler, in this process) and the confirmed write of one sync record."""

import errno
import os
import threading
from typing import Any, Optional, Sequence

from .._batchwrite import BatchWriter, CLHHandler, LockTimeout, LockWait, rotating_part
from ._batching import cannot_travel
from ._plans import Item, to_lines
from ._stats import STATE_FALLBACK, ClientStats

# Seconds a fallback write waits at most while another process holds the
# file's lock (a rotation with gzip of a large file holds it for seconds; a
# process that never lets go must not hold our records for ever).
LOCK_WAIT = 10.0
# Stopping: the drain's deadline ends the wait for the daemon, not the
# records' last write. What it did not acknowledge is written through the
# fallback, which may still wait this long past the deadline for the lock
# (0 would lose the lot whenever the daemon is mid-write at that moment).
# Below nonblocking.STOP_MARGIN, so the sender ends before stop() takes over.
FINAL_LOCK_WAIT = 0.4
# Errors that writing again soon will not cure: the records are lost at once
# (counted, announced) instead of being retried until exit.
PERMANENT_ERRORS = frozenset((errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                              errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL))


def is_permanent(exc: BaseException) -> bool:
    """Whether a failed write is worth trying again (a full disk, a held
    lock, an I/O error may pass; a permission or a path will not)."""
    return isinstance(exc, OSError) and not isinstance(exc, LockTimeout) and exc.errno in PERMANENT_ERRORS


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Fallback:
    """Direct writes through the wrapped CLH handler (same file, same lock,
    same rotation) with the batch-write seam the daemon uses. Thread-safe:
    CLH's own thread lock serialises the sender and callers' sync writes."""

    def __init__(self, handler: CLHHandler, stats: ClientStats) -> None:
        self.writer = BatchWriter(handler)
        self.stats = stats
        self._lock = threading.Lock()
        clh = rotating_part(handler)
        # Where the file and its lock live: created when missing, as the
        # daemon does for its clients.
        self._dirs = sorted({os.path.dirname(clh.baseFilename), os.path.dirname(clh.lockFilename)})
        self.error: Optional[BaseException] = None  # why the last write failed

    def write(self, lines: Sequence[Item], lock_wait: Optional[LockWait] = LOCK_WAIT) -> bool:
        """Write lines (field values are rendered here first); on error count
        it, keep last_error and ``error``, and return False. ``lock_wait``:
        see ``BatchWriter.write``."""
        if not lines:
            return True
        try:
            self._write(to_lines(lines), lock_wait)
        except Exception as exc:
            with self._lock:
                self.error = exc
                self.stats.write_errors += 1
                self.stats.last_error = f"fallback write failed: {describe(exc)}"
            return False
        with self._lock:
            self.stats.fallback_written += len(lines)
        return True

    def _write(self, lines: Sequence[str], lock_wait: Optional[LockWait]) -> None:
        try:
            self.writer.write(lines, lock_wait=lock_wait)
        except FileNotFoundError:
            if not self._make_dirs():
                raise
            self.writer.write(lines, lock_wait=lock_wait)

    def _make_dirs(self) -> bool:
        """Create the file's missing directories as the daemon would
        (mode 0o777 less the umask); False if none was missing. A directory
        that cannot be created raises the reason (permission, say)."""
        made = False
        for directory in self._dirs:
            if not os.path.isdir(directory):
                os.makedirs(directory, exist_ok=True)
                made = True
        return made


class Confirmed:
    """Writes one line and returns only once it is in the file: through the
    daemon (the transport's SyncLane) when it is reachable, else through the fallback."""

    def __init__(self, sync: Optional[Any], fallback: Fallback, stats: ClientStats) -> None:
        self.sync = sync
        self.fallback = fallback
        self.stats = stats

    def write(self, line: Item) -> None:
        """Raises OSError when even the fallback could not write the line
        (then it is counted as lost: the caller's handleError says why)."""
        if self.sync is not None and self.stats.state != STATE_FALLBACK:
            reason = cannot_travel(line, self.stats.record_limit)
            if reason:
                # Too large: the daemon would refuse it, or libzmq cut the REQ off
                # (a sync_timeout). Not UTF-8: msgpack refuses it.
                self.stats.count(reason)
            elif self.sync.write(line):
                return
        if not self.fallback.write([line]):
            self.stats.lose(1, self.stats.last_error)
            raise OSError(self.stats.last_error) from self.fallback.error
