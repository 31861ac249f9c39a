"""Per-file writers and the router that picks one for each message.

The main loop ``route``s a decoded batch to the file's ``FileWriter``; the
writer's thread ``write``s everything queued under one CLH lock and ``ack``s
each message through an inproc socket back to the main loop, which owns the
ROUTER socket (zmq sockets are not shared between threads).
"""

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Hashable, List, NamedTuple, Optional, Tuple

import zmq

from .. import protocol
from .._batchwrite import BatchWriter, build_handler
from .config import Config
from .paths import PathPolicy
from .stats import DaemonStats, FileStats

log = logging.getLogger("clh_writerd.daemon")

# Records written under one lock acquisition at most: bounds ack latency when
# many batches are queued.
MAX_RECORDS_PER_WRITE = 8192


class Work(NamedTuple):
    """One message to write: its lines, and the reply that tells its sender."""

    envelope: List[bytes]  # ROUTER routing frames to echo back
    lines: List[str]
    ok_reply: bytes
    seq: Optional[int]  # batch sequence, for an error reply
    id: Optional[int]  # sync request id, for an error reply


class FileWriter:
    """One file: a bounded queue and the thread that writes it."""

    def __init__(
        self,
        path: str,
        options: Dict[str, Any],
        stats: FileStats,
        context: zmq.Context,
        ack_endpoint: str,
        capacity: int,
        chunk_chars: int,
        fsync_policy: str = "never",
        fsync_interval: float = 1.0,
    ) -> None:
        self.path = path
        self.options = options
        self.options_key = protocol.options_key(options)
        self.stats = stats
        self.capacity = capacity
        self.fsync_policy = fsync_policy
        self.fsync_interval = fsync_interval
        self._writer = BatchWriter(build_handler(path, options), chunk_chars)
        self._context = context
        self._ack_endpoint = ack_endpoint
        self._batches: Deque[Work] = deque()
        self._sync: Deque[Work] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._last_fsync = time.monotonic()
        self._unsynced = False
        self._thread = threading.Thread(target=self._run, name=f"writer:{path}", daemon=True)

    # -- main-loop side ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, work: Work, sync: bool = False) -> bool:
        """Queue work; False when the queue is full (sync records always fit)."""
        with self._cond:
            if self._stopping:
                return False
            if not sync and len(self._batches) >= self.capacity:
                return False
            (self._sync if sync else self._batches).append(work)
            self.stats.queue_depth = len(self._batches) + len(self._sync)
            self._cond.notify()
        return True

    def stop(self) -> None:
        """Write what is queued, then end the thread (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: Optional[float]) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- writer thread -----------------------------------------------------
    def _take(self) -> Optional[List[Work]]:
        """Sync work first, then queued batches; None once stopped and empty."""
        with self._cond:
            while not (self._sync or self._batches or self._stopping):
                if not self._cond.wait(self._wait_time()):
                    return []  # idle tick: time for an interval fsync
            if not (self._sync or self._batches):
                return None
            items = list(self._sync)
            self._sync.clear()
            records = sum(len(w.lines) for w in items)
            while self._batches and records < MAX_RECORDS_PER_WRITE:
                work = self._batches.popleft()
                items.append(work)
                records += len(work.lines)
            self.stats.queue_depth = len(self._batches)
            return items

    def _wait_time(self) -> Optional[float]:
        if self.fsync_policy == "interval" and self._unsynced:
            return max(0.0, self.fsync_interval - (time.monotonic() - self._last_fsync))
        return None

    def _run(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._ack_endpoint)
        try:
            while True:
                items = self._take()
                if items is None:
                    break
                if items:
                    self._write(items, push)
                self._interval_fsync()
        finally:
            self._interval_fsync(force=True)
            push.close()
            self._writer.close()

    def _write(self, items: List[Work], push: zmq.Socket) -> None:
        lines = [line for work in items for line in work.lines]
        fsync = self.fsync_policy == "batch"
        started = time.perf_counter()
        try:
            result = self._writer.write(lines, fsync=fsync)
        except Exception as exc:  # disk full, permissions, ...: never ack it
            self._failed(items, push, exc)
            return
        stats = self.stats
        stats.latency.add(time.perf_counter() - started)
        stats.writes += 1
        stats.batches_written += len(items)
        stats.records_written += len(lines)
        stats.bytes_written += result.bytes
        stats.rotations += result.rotations
        stats.fsyncs += int(fsync)
        self._unsynced = not fsync
        for work in items:
            push.send_multipart(work.envelope + [work.ok_reply])

    def _failed(self, items: List[Work], push: zmq.Socket, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        stats = self.stats
        if message != stats.last_error or stats.write_errors % 1000 == 0:
            log.error("write to %s failed, %d message(s) not acknowledged: %s", self.path, len(items), message)
        stats.write_errors += 1
        stats.last_error = message
        for work in items:
            reply = protocol.encode_error(protocol.E_WRITE_FAILED, message, seq=work.seq, id=work.id)
            push.send_multipart(work.envelope + [reply])

    def _interval_fsync(self, force: bool = False) -> None:
        if not self._unsynced or self.fsync_policy == "never":
            return
        if force or time.monotonic() - self._last_fsync >= self.fsync_interval:
            try:
                if self._writer.fsync():
                    self.stats.fsyncs += 1
            except OSError as exc:
                self.stats.last_error = f"fsync: {exc}"
            self._unsynced = False
            self._last_fsync = time.monotonic()


WriterFactory = Callable[[str, Dict[str, Any]], FileWriter]


class Router:
    """Maps (path, options) to the file's writer, enforcing the daemon's policy.

    First declaration wins: a later client declaring different options for
    the same file is served with the first options and counted as a conflict.
    """

    def __init__(self, config: Config, stats: DaemonStats, make_writer: WriterFactory) -> None:
        self.stats = stats
        self.writers: Dict[str, FileWriter] = {}
        self._make_writer = make_writer
        self._cache: Dict[Hashable, FileWriter] = {}
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.config = config
        self.policy = PathPolicy(config.allowed_dirs)
        self._cache.clear()  # every path is checked again under the new policy

    def route(self, path: str, options: Dict[str, Any]) -> FileWriter:
        key: Hashable
        try:
            key = (path, tuple(options.items()))
            writer = self._cache.get(key)
        except TypeError:  # a list value (owner): use the canonical form
            key = (path, protocol.options_key(options))
            writer = self._cache.get(key)
        if writer is None:
            writer = self._resolve(path, options)
            if len(self._cache) > 16 * self.config.max_files:
                self._cache.clear()
            self._cache[key] = writer
        return writer

    def _resolve(self, path: str, options: Dict[str, Any]) -> FileWriter:
        opts = protocol.check_file_options(options)
        real = self.policy.check(path)
        if "lock_file_directory" in opts:
            opts["lock_file_directory"] = self.policy.check_dir(opts["lock_file_directory"], "lock_file_directory")
        if "owner" in opts and not self.config.allow_owner:
            raise protocol.ProtocolError(protocol.E_BAD_OPTIONS, "owner is refused (allow_owner = false)")
        writer = self.writers.get(real)
        if writer is not None:
            if protocol.options_key(opts) != writer.options_key:
                writer.stats.option_conflicts += 1
                log.warning("conflicting options for %s: keeping %s, ignoring %s", real, writer.options, opts)
            return writer
        if len(self.writers) >= self.config.max_files:
            raise protocol.ProtocolError(protocol.E_TOO_LARGE, f"this daemon serves at most {self.config.max_files} files")
        try:
            self.policy.ensure_parent(real)
            writer = self._make_writer(real, opts)
        except (KeyError, ValueError) as exc:  # unknown owner user or group, ...
            raise protocol.ProtocolError(protocol.E_BAD_OPTIONS, f"cannot serve {real}: {exc}") from None
        except OSError as exc:  # permissions, a file where a directory should be, ...
            raise protocol.ProtocolError(protocol.E_WRITE_FAILED, f"cannot open {real}: {exc}") from None
        self.writers[real] = writer
        log.info("serving %s with %s", real, opts)
        return writer

    def stop_all(self) -> None:
        for writer in self.writers.values():
            writer.stop()

    def join_all(self, deadline: float) -> Tuple[int, int]:
        """Wait for the writers until ``deadline``; (finished, still running)."""
        done = 0
        for writer in self.writers.values():
            if writer.join(max(0.0, deadline - time.monotonic())):
                done += 1
        return done, len(self.writers) - done
