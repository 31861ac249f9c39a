"""Many lines under one concurrent-log-handler lock.

This is the seam both sides write through: the daemon's per-file writers and
the clients' fallback. CLH's own ``emit()`` takes the lock, checks rollover
and writes once per record, and swallows errors into ``handleError``; here a
whole list of rendered lines is written under one lock acquisition, with a
rollover check per chunk (chunks are capped in size so rotation stays close
to maxBytes), and errors propagate so nothing is acknowledged unwritten.

Because both sides use the same CLH handler options, the same
``do_write`` and the same terminator, a line is the same bytes whichever way
it travelled.
"""

import codecs
import locale
import logging
import os
import time
from contextlib import suppress
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from concurrent_log_handler import ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler

try:
    import fcntl
except ImportError:  # not POSIX: no bounded wait for the lock (CLH's own wait applies)
    fcntl = None  # type: ignore[assignment]

CLHHandler = Union[ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler]

# Upper bound of one write call (characters); a batch larger than this is
# written in several chunks, each after its own rollover check.
DEFAULT_CHUNK_CHARS = 256 * 1024

# CLH's shouldRollover() ignores its record argument; it still wants one.
_PROBE = logging.makeLogRecord({"msg": ""})

# TimedRotatingFileHandler stores interval * unit seconds; this undoes it.
_WHEN_SECONDS = {"S": 1, "M": 60, "H": 3600, "D": 86400, "MIDNIGHT": 86400}


class LockTimeout(OSError):
    """Another process held the file's CLH lock for longer than the write
    may wait (``BatchWriter.write(lock_wait=...)``)."""


# How long a write may wait for the lock: seconds from now, or a function
# giving the seconds left, read again while waiting (a deadline that may come
# nearer meanwhile: a stop requested by another thread).
LockWait = Union[float, Callable[[], float]]


class WriteResult(NamedTuple):
    bytes: int
    rotations: int
    skipped: int = 0  # lines the encoding refused (unicode_error_policy="strict")


def _countdown(seconds: float) -> Callable[[], float]:
    end = time.monotonic() + seconds
    return lambda: end - time.monotonic()


def rotating_part(handler: CLHHandler) -> ConcurrentRotatingFileHandler:
    """The ConcurrentRotatingFileHandler that holds the stream and the lock
    (a timed handler keeps one as ``.clh``)."""
    clh = handler.clh if isinstance(handler, ConcurrentTimedRotatingFileHandler) else handler
    if not isinstance(clh, ConcurrentRotatingFileHandler):
        raise TypeError(f"expected a concurrent-log-handler handler, got {type(handler).__name__}")
    return clh


def build_handler(path: str, options: Dict[str, Any]) -> CLHHandler:
    """Build the CLH handler that ``options`` (validated by the protocol) describe."""
    kwargs = dict(options)
    if "owner" in kwargs:
        kwargs["owner"] = tuple(kwargs["owner"])
    if "when" in kwargs:
        return ConcurrentTimedRotatingFileHandler(path, **kwargs)
    return ConcurrentRotatingFileHandler(path, **kwargs)


def describe_handler(handler: CLHHandler) -> Tuple[str, Dict[str, Any]]:
    """The (absolute path, options) that rebuild ``handler`` with build_handler.

    Used by clients to tell the daemon how a file is configured, so the app's
    logging configuration stays the single source of truth. The encoding is
    always explicit, so the daemon's locale cannot change the bytes.
    """
    timed = isinstance(handler, ConcurrentTimedRotatingFileHandler)
    clh = rotating_part(handler)
    encoding = clh.encoding or locale.getpreferredencoding(False)
    options: Dict[str, Any] = {
        "maxBytes": int(clh.maxBytes),
        "backupCount": int(handler.backupCount),
        "use_gzip": bool(clh.use_gzip),
        "encoding": codecs.lookup(encoding).name,
        "terminator": clh.terminator,
        "unicode_error_policy": clh.unicode_error_policy,
    }
    if clh.newline is not None:
        options["newline"] = clh.newline
    if clh.chmod is not None:
        options["chmod"] = int(clh.chmod)
    if clh.umask is not None:
        options["umask"] = int(clh.umask)
    if clh.owner:
        options["owner"] = [str(clh.owner[0]), str(clh.owner[1])]
    lock_dir = os.path.dirname(clh.lockFilename)
    if lock_dir != os.path.dirname(clh.baseFilename):
        options["lock_file_directory"] = lock_dir
    if timed:
        if getattr(handler, "atTime", None) is not None:
            raise ValueError("atTime is not supported by clh-writerd")
        when = handler.when.upper()  # type: ignore[union-attr]
        unit = 604800 if when.startswith("W") else _WHEN_SECONDS[when]
        options["when"] = when
        options["interval"] = max(1, int(handler.interval) // unit)  # type: ignore[union-attr]
        options["utc"] = bool(handler.utc)  # type: ignore[union-attr]
    return clh.baseFilename, options


class BatchWriter:
    """Writes lists of rendered lines to one file through its CLH handler.

    ``write()`` holds the CLH lock once for the whole list. On a failed write
    the file is cut back to where this chunk started, so a failure leaves no
    torn line, and the error propagates to the caller.
    """

    def __init__(self, handler: CLHHandler, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> None:
        self.handler = handler
        self._clh = rotating_part(handler)
        max_bytes = self._clh.maxBytes
        # Several rollover checks per maxBytes keep rotated files near their size.
        self.chunk_chars = min(chunk_chars, max(256, max_bytes // 8)) if max_bytes > 0 else chunk_chars
        self.terminator = self._clh.terminator

    @property
    def path(self) -> str:
        return str(self._clh.baseFilename)

    def write(self, lines: Sequence[str], fsync: bool = False, lock_wait: Optional[LockWait] = None) -> WriteResult:
        """Write ``lines`` (each gets the terminator) under one lock acquisition.

        ``lock_wait`` (see LockWait): how long to wait at most while another
        process holds the lock, then raise LockTimeout (nothing written);
        None waits as long as CLH does (for ever)."""
        if not lines:
            return WriteResult(0, 0)
        if lock_wait is None:
            return self._write(lines, fsync)
        left = lock_wait if callable(lock_wait) else _countdown(lock_wait)
        # Bounded: first this process's own writers (CLH's thread lock, an
        # RLock that _do_lock() then re-enters), then other processes.
        thread_lock = getattr(self._clh, "_thread_lock", None)
        if thread_lock is not None and not thread_lock.acquire(timeout=max(0.0, left())):
            raise LockTimeout(f"another thread's write to {self.path} did not end in time")
        try:
            self._wait_for_lock(left)
            return self._write(lines, fsync)
        finally:
            if thread_lock is not None:
                thread_lock.release()

    def write_now(self, lines: Sequence[str]) -> Optional[WriteResult]:
        """``write(lines)`` if it can be done without waiting: no other
        thread of this process is writing, no other process holds the lock
        (taken with LOCK_NB on CLH's own lock descriptor: no window between
        a probe and the lock), the log and lock files are open and no
        rotation is due (a rotation may gzip a whole file). None: nothing
        was written; use write()."""
        clh = self._clh
        thread_lock = getattr(clh, "_thread_lock", None)
        if fcntl is None or thread_lock is None or not thread_lock.acquire(blocking=False):
            return None
        try:
            lock, stream = clh.stream_lock, clh.stream
            if clh.is_locked or lock is None or lock.closed or stream is None or stream.closed:
                return None
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None
            try:
                try:
                    due = self.handler.shouldRollover(_PROBE)
                except OSError:
                    return None  # write() decides, as CLH's emit() would
                if not lines or due:
                    return None if lines else WriteResult(0, 0)
                # Both locks are held: CLH's own _do_lock() would only take them again.
                clh.is_locked = True
                try:
                    return self._write_locked(lines, False, roll=False)
                finally:
                    clh.is_locked = False
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        finally:
            thread_lock.release()

    def _write(self, lines: Sequence[str], fsync: bool) -> WriteResult:
        clh = self._clh
        clh._do_lock()
        try:
            return self._write_locked(lines, fsync)
        finally:
            clh._do_unlock()

    def _write_locked(self, lines: Sequence[str], fsync: bool, roll: bool = True) -> WriteResult:
        """The write, both locks held. ``roll=False``: the caller found no
        rotation due under those locks (write_now: never a gzip here)."""
        clh = self._clh
        clh._check_stream()
        written = rotations = skipped = 0
        for chunk in self._chunks(lines):
            if roll:
                rotations += self._roll_if_needed()
            try:
                written += self._write_chunk(chunk)
            except UnicodeError:
                # As CLH's emit() would: drop only the lines the file's
                # encoding refuses, not the whole batch.
                for line in chunk:
                    try:
                        written += self._write_chunk([line])
                    except UnicodeError:
                        skipped += 1
        if fsync and clh.stream is not None:
            os.fsync(clh.stream.fileno())
        return WriteResult(written, rotations, skipped)

    def _wait_for_lock(self, left: Callable[[], float]) -> None:
        """Return once no other process holds the lock file, or raise
        LockTimeout when ``left()`` seconds are up. Probed on a descriptor of its own, so
        CLH's blocking flock() that follows waits only for ordinary
        contention (another writer's batch), never for a holder that does
        not let go."""
        if fcntl is None:
            return
        try:
            fd = os.open(self._clh.lockFilename, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return  # no lock file yet (nobody holds it), or one CLH itself will report on
        try:
            started = time.monotonic()
            pause = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    return
                except BlockingIOError:
                    remaining = left()
                    if remaining <= 0:
                        raise LockTimeout(f"the lock file {self._clh.lockFilename} was held by another process "
                                          f"for {time.monotonic() - started:.1f}s") from None
                    time.sleep(min(pause, remaining))
                    pause = min(pause * 2, 0.05)
        finally:
            os.close(fd)

    def fsync(self) -> bool:
        """fsync the open stream, if any (for interval policies); True if done."""
        stream = self._clh.stream
        if stream is None or stream.closed:
            return False
        stream.flush()
        os.fsync(stream.fileno())
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Close the handler's log and lock files, never under another
        thread's write: CLH's close() drops the lock file without its thread
        lock, so a write in progress then skips releasing that lock and
        every later write of the process waits for it forever. Waits up to
        ``timeout`` for such a write; False if it did not end (the files are
        left open: a stuck write keeps a consistent lock state)."""
        lock = getattr(self._clh, "_thread_lock", None)
        if lock is None:  # not the CLH this seam was written against: close as it is
            self.handler.close()
            return True
        if not lock.acquire(timeout=timeout):
            return False
        try:
            self.handler.close()
        finally:
            lock.release()
        return True

    def reopen(self) -> None:
        """Close the log and lock streams (outside write()); the next write opens them again."""
        clh = self._clh
        clh._close()
        lock = clh.stream_lock
        if lock is not None and not clh.is_locked:
            clh.stream_lock = None
            with suppress(Exception):
                lock.close()

    def _chunks(self, lines: Sequence[str]) -> List[List[str]]:
        limit = self.chunk_chars
        if sum(map(len, lines)) + len(lines) <= limit:  # the common case, counted in C
            return [list(lines)]
        chunks: List[List[str]] = []
        current: List[str] = []
        size = 0
        for line in lines:
            if current and size + len(line) > limit:
                chunks.append(current)
                current, size = [], 0
            current.append(line)
            size += len(line) + 1
        chunks.append(current)
        return chunks

    def _roll_if_needed(self) -> int:
        # As in CLH's emit(): a failed rollover is reported but the write goes on.
        before = getattr(self.handler, "num_rollovers", 0)
        try:
            if self.handler.shouldRollover(_PROBE):
                self.handler.doRollover()
        except OSError:
            return 0
        return int(getattr(self.handler, "num_rollovers", 0) != before)

    def _write_chunk(self, chunk: List[str]) -> int:
        clh = self._clh
        if clh.stream is None or clh.stream.closed:
            clh.stream = clh.do_open()
        stream = clh.stream
        start = stream.seek(0, os.SEEK_END)
        try:
            # do_write appends the terminator to the last line and flushes.
            clh.do_write(self.terminator.join(chunk))
            end = stream.seek(0, os.SEEK_END) if not stream.closed else start
        except BaseException:
            self._discard_from(start)
            raise
        return max(0, end - start)

    def _discard_from(self, start: int) -> None:
        """Drop a half-written chunk: close the stream and cut the file back."""
        clh = self._clh
        stream, clh.stream = clh.stream, None
        if stream is None:
            return
        # Cut through the descriptor, never by name: the name may have been
        # replaced (by a symlink, say) since the file was opened.
        try:
            fd = os.dup(stream.fileno())
        except (OSError, ValueError):
            fd = -1
        with suppress(Exception):
            stream.close()  # may try to flush the rest again: cut afterwards
        if fd >= 0:
            with suppress(OSError):
                os.ftruncate(fd, start)
            os.close(fd)
