"""Per-file writers and the router that picks one for each message.

The main loop ``route``s a decoded batch to the file's ``FileWriter``; the
writer's thread ``write``s everything queued under one CLH lock and ``ack``s
each message through the ``AckQueue`` back to the main loop, which owns the
ROUTER socket (zmq sockets are not shared between threads). Writers hold no
zmq socket of their own, so the number of files never meets zmq's socket
limit, and an idle file is closed (its thread, descriptors and lock) after
``idle_file_seconds`` or when its slot is needed.
"""

import errno
import logging
import os
import pwd
import stat
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, Hashable, List, NamedTuple, Optional, Tuple

from .. import protocol
from .._batchwrite import BatchWriter, rotating_part
from .config import Config
from .paths import W, X, Authority, PathPolicy, Target, refuse_non_file
from .policy import OptionPolicy
from .safefiles import DirHandle, build_safe_handler, hardlinked
from .stats import PEER_LOGGER, DaemonStats, FileStats, printable, process_start

log = logging.getLogger(PEER_LOGGER)  # what a client provokes here is rate-limited

# Records written under one lock acquisition at most: bounds ack latency when
# many batches are queued.
MAX_RECORDS_PER_WRITE = 8192


# The directories of a file are walked again (no symlink followed, the
# permissions on the way read again) at least this often, and after a
# rotation; between walks one lstat per write checks they are still at
# their names.
REWALK_SECONDS = 1.0

# A sync record is written on the main loop's thread (FileWriter.write_now)
# only when it is at most this large and the file's last write took at most
# INLINE_MAX_SECONDS: the main loop never waits for a slow disk or a large
# write on one client's behalf.
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_SECONDS = 0.002

# What one queued record costs beyond its characters (the str object and
# the list slot): queued bytes are counted as characters + this per record.
RECORD_OVERHEAD_BYTES = 64


def queued_cost(lines: List[str]) -> int:
    """The bytes ``lines`` count against the queue budgets (counted in C)."""
    return sum(map(len, lines)) + RECORD_OVERHEAD_BYTES * len(lines)


class Work(NamedTuple):
    """One message to write: its lines, and the reply that tells its sender."""

    envelope: List[bytes]  # ROUTER routing frames to echo back
    lines: List[str]
    ok_reply: bytes
    seq: Optional[int]  # batch sequence, for an error reply
    id: Optional[int]  # sync request id, for an error reply
    cost: int = 0  # queued_cost(lines), reserved in the QueueBudget until written
    principal: Hashable = None  # who sent it (access.Peer.principal): whose budget it counts against
    authority: Any = None  # access.Authority of an unprivileged peer, checked on the opened file; None: ours


class QueueBudget:
    """Bytes queued for writing over all files: per peer and in total.

    The main loop ``reserve``s when it queues a message; the writer thread
    ``release``s once the message is written or refused. A message that
    would pass a budget is refused (``busy``) unless nothing of that kind is
    queued (a single message larger than a budget still goes through, one
    at a time).
    """

    def __init__(self, total: int, per_peer: int) -> None:
        self.total_limit, self.peer_limit = total, per_peer
        self.total = 0
        self.peers: Dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def reserve(self, principal: Hashable, cost: int) -> str:
        """"" when reserved, else which budget is full."""
        with self._lock:
            if self.total and self.total + cost > self.total_limit:
                return f"total_queue_bytes ({self.total_limit}) reached"
            mine = self.peers.get(principal, 0)
            if mine and mine + cost > self.peer_limit:
                return f"peer_queue_bytes ({self.peer_limit}) reached for this peer"
            self.total += cost
            self.peers[principal] = mine + cost
            return ""

    def release(self, principal: Hashable, cost: int) -> None:
        with self._lock:
            self.total -= cost
            left = self.peers.get(principal, 0) - cost
            if left > 0:
                self.peers[principal] = left
            else:
                self.peers.pop(principal, None)


class AckQueue:
    """Replies from writer threads to the main loop: a deque plus a pipe the
    loop polls (zmq.Poller takes plain descriptors). One pipe for all files."""

    def __init__(self) -> None:
        self._items: Deque[List[bytes]] = deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def fileno(self) -> int:
        return self._read_fd

    def put_many(self, replies: List[List[bytes]]) -> None:
        self._items.extend(replies)
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the loop will drain
        except OSError:
            pass  # closed during shutdown

    def put(self, reply: List[bytes]) -> None:
        self.put_many([reply])

    def drain(self) -> List[List[bytes]]:
        """Everything queued now (after clearing the wake-ups, so nothing is missed)."""
        try:
            while os.read(self._read_fd, 65536):
                pass
        except (BlockingIOError, OSError):
            pass
        out = []
        items = self._items
        while items:
            out.append(items.popleft())
        return out

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# Rolling redeploys (Router._resolve): processes remembered per file as
# having declared its options, at most; a peer without a pid (tcp) counts as
# alive this long after its last batch.
MAX_DECLARERS = 4096
ANONYMOUS_DECLARER_SECONDS = 60.0


class FileWriter:
    """One file: a bounded queue and the thread that writes it."""

    def __init__(
        self,
        target: Target,
        options: Dict[str, Any],
        stats: FileStats,
        acks: AckQueue,
        capacity: int,
        chunk_chars: int,
        fsync_policy: str = "never",
        fsync_interval: float = 1.0,
        lock_target: Optional[Target] = None,
        count: Callable[[str], None] = lambda name: None,
        budget: Optional[QueueBudget] = None,
        byte_capacity: int = 0,
        authority: Any = None,
    ) -> None:
        self.path = target.path
        self.options = options
        self.options_key = protocol.options_key(options)
        self.stats = stats
        self.capacity = capacity
        self.byte_capacity = byte_capacity  # queue_bytes; 0: no byte bound of its own
        self.queued_bytes = 0
        self.refusal = ""  # why the last submit() was refused
        self.opener: Hashable = None  # the principal whose peer_max_files share this file counts against
        # Who declared these options: ipc processes by pid (and start time,
        # so a reused pid does not count), tcp peers by when last seen.
        self.declarers: Dict[int, Optional[bytes]] = {}
        self.anonymous_declared = 0.0
        self._budget = budget
        self.fsync_policy = fsync_policy
        self.fsync_interval = fsync_interval
        self.last_used = time.monotonic()
        self._count = count
        # Rotations one write may do before it deletes its own first lines.
        self._max_rotations = options.get("backupCount", 0)
        self._dir = DirHandle(target.root, target.dirs, authority=authority)
        self._lock_dir: Optional[DirHandle] = None
        try:
            refuse_non_file(self._dir.fd, target.name, target.path)
            if authority is not None:
                self._check_opener(authority, target.name, options)
            if lock_target is not None:
                self._lock_dir = DirHandle(lock_target.root, lock_target.parts, "lock_file_directory", authority)
            self._writer = BatchWriter(build_safe_handler(self._dir, target.name, self._lock_dir, options),
                                       chunk_chars)
        except BaseException:
            self._close_dirs()
            raise
        self._acks = acks
        self._batches: Deque[Work] = deque()
        self._sync: Deque[Work] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._last_fsync = time.monotonic()
        self._unsynced = False
        self._busy = False
        self._rewalk_at = 0.0  # when the directories must be walked again (_refresh_dirs)
        self._last_write_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"writer:{self.path}", daemon=True)

    def declared_by(self, pid: Optional[int]) -> None:
        """A batch for this file with its options came from process ``pid``."""
        if pid in self.declarers:
            return
        if pid and len(self.declarers) < MAX_DECLARERS:
            self.declarers[pid] = process_start(pid)
        else:  # no pid (tcp), or too many to follow: alive until quiet for a while
            self.anonymous_declared = time.monotonic()

    def live_declarers(self) -> List[int]:
        """The processes that declared the served options and still run
        (pids; -1 for peers without one, seen within ANONYMOUS_DECLARER_SECONDS)."""
        for pid, start in list(self.declarers.items()):
            if start is None or process_start(pid) != start:
                del self.declarers[pid]
        live = list(self.declarers)
        if self.anonymous_declared and time.monotonic() - self.anonymous_declared < ANONYMOUS_DECLARER_SECONDS:
            live.append(-1)
        return live

    def _check_opener(self, authority: Authority, name: str, options: Dict[str, Any]) -> None:
        """The peer that opens the file must be able to do itself what its
        options ask: write the file (or create it in the directory), change
        its mode or owner only if it owns it, rotate it only where it could
        rename it. Never to hand the file to itself (owner = its own user)."""
        dir_st = self._dir.levels[-1]
        try:
            st: Optional[os.stat_result] = os.stat(name, dir_fd=self._dir.fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        directory = self._dir.real_path
        if st is None:
            if not authority.may(dir_st, W | X):
                raise authority.refuse("create files in", directory, dir_st)
        else:
            if st.st_nlink > 1:
                raise hardlinked(self.path, "log file")
            if not authority.may(st, W):
                raise authority.refuse("write", self.path, st)
            if "chmod" in options and stat.S_IMODE(st.st_mode) != options["chmod"] and not authority.owns(st):
                raise authority.refuse(f"change the mode ({oct(options['chmod'])}) of", self.path, st)
            if "owner" in options and not authority.owns(st):
                raise authority.refuse("change the owner of", self.path, st)
        if "owner" in options:
            try:
                user = pwd.getpwnam(options["owner"][0]).pw_uid
            except KeyError:
                user = None
            if user == authority.uid:
                raise authority.refuse("give itself (owner option)", self.path, st)
        if (options.get("maxBytes", 0) > 0 or "when" in options) and not authority.may_rename_in(dir_st, st):
            raise authority.refuse("rotate files in", directory, dir_st)

    def _permitted(self, items: List[Work]) -> Tuple[List[Work], List[Tuple[Work, protocol.ProtocolError]]]:
        """Split ``items`` into those whose peers may write the file as it is
        now (the opened file, its directories) and those refused; a file with
        another hard link is refused for everyone."""
        stream = rotating_part(self._writer.handler).stream
        st: Optional[os.stat_result] = None
        try:
            if stream is not None and not stream.closed:
                st = os.fstat(stream.fileno())
            else:
                st = os.stat(os.path.basename(self.path), dir_fd=self._dir.fd, follow_symlinks=False)
        except (OSError, ValueError):
            st = None
        if st is not None and st.st_nlink > 1:
            error = hardlinked(self.path, "log file")
            return [], [(work, error) for work in items]
        peers = {work.authority for work in items if work.authority is not None}
        if not peers:
            return items, []
        levels = self._dir.levels
        denied: Dict[Authority, protocol.ProtocolError] = {}
        for peer in peers:
            if not all(peer.may(level, X) for level in levels):
                denied[peer] = peer.refuse("search the directories of", self.path)
            elif st is not None and not peer.may(st, W):
                denied[peer] = peer.refuse("write", self.path, st)
            elif st is None and not peer.may(levels[-1], W | X):
                denied[peer] = peer.refuse("create files in", self._dir.real_path, levels[-1])
        if not denied:
            return items, []
        return ([w for w in items if w.authority not in denied],
                [(w, denied[w.authority]) for w in items if w.authority in denied])

    # -- main-loop side ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def has_room(self, sync: bool = False) -> bool:
        """Whether submit() finds a place by count (bytes are checked there):
        the main loop renders a batch only then. Sets ``refusal`` when not."""
        if self._stopping:
            self.refusal = "the file is being closed"
            return False
        if len(self._sync if sync else self._batches) >= self.capacity:
            self.refusal = f"queue_batches ({self.capacity}) reached"
            return False
        return True

    def submit(self, work: Work, sync: bool = False) -> bool:
        """Queue work; False when a queue is full (``refusal`` says which):
        batches and sync records each have ``capacity`` places, so neither
        starves the other; their bytes count against ``byte_capacity`` and
        the shared QueueBudget."""
        with self._cond:
            if self._stopping:
                self.refusal = "the file is being closed"
                return False
            if len(self._sync if sync else self._batches) >= self.capacity:
                self.refusal = f"queue_batches ({self.capacity}) reached"
                return False
            if self.byte_capacity and self.queued_bytes and self.queued_bytes + work.cost > self.byte_capacity:
                self.refusal = f"queue_bytes ({self.byte_capacity}) reached"
                return False
            if self._budget is not None:
                self.refusal = self._budget.reserve(work.principal, work.cost)
                if self.refusal:
                    return False
            self.queued_bytes += work.cost
            (self._sync if sync else self._batches).append(work)
            self.stats.queue_depth = len(self._batches) + len(self._sync)
            self.stats.queue_bytes = self.queued_bytes
            self._cond.notify()
        return True

    def write_now(self, work: Work) -> Optional[List[List[bytes]]]:
        """A sync record written here, on the main loop's thread: no hand-off
        to the writer thread and back (two thread wake-ups), when that costs
        no wait: nothing of this file queued or being written (so order is
        kept), no fsync per write, a small record, a fast last write, the
        lock free now and no rotation due. Its replies (the ack, or an error)
        once done; None: nothing done, submit() it."""
        if (self.fsync_policy == "batch" or work.cost > INLINE_MAX_BYTES
                or self._last_write_seconds > INLINE_MAX_SECONDS):
            return None
        with self._cond:
            if self._busy or self._batches or self._sync or self._stopping:
                return None
            self._busy = True
        replies: List[List[bytes]] = []
        try:
            return replies if self._write([work], replies) else None
        except Exception as exc:  # as in _run: answer and go on
            self._failed([work], exc, protocol.E_INTERNAL, replies)
            return replies
        finally:
            with self._cond:
                self._busy = False
                if self._batches or self._sync or self._unsynced:
                    self._cond.notify()  # the writer thread waits for us (never woken for nothing)

    def _release(self, items: List[Work]) -> None:
        """Written or refused: their bytes leave the budgets."""
        cost = 0
        for work in items:
            cost += work.cost
            if self._budget is not None and work.cost:
                self._budget.release(work.principal, work.cost)
        with self._cond:
            self.queued_bytes -= cost
            self.stats.queue_bytes = self.queued_bytes

    def stop(self) -> None:
        """Write what is queued, then end the thread (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: Optional[float]) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def idle(self) -> bool:
        """Nothing queued or being written (safe to close)."""
        return not (self._batches or self._sync or self._busy)

    # -- writer thread -----------------------------------------------------
    def _take(self) -> Optional[List[Work]]:
        """Sync work first, then queued batches; None once stopped and empty."""
        with self._cond:
            while not (self._sync or self._batches or self._stopping):
                if not self._cond.wait(self._wait_time()) and not self._busy:
                    self._busy = True  # idle tick: time for an interval fsync (never beside write_now)
                    return []
            if not (self._sync or self._batches):
                return None
            while self._busy:  # write_now on the main loop's thread
                self._cond.wait()
            self._busy = True
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
        try:
            while True:
                items = self._take()
                if items is None:
                    break
                try:
                    if items:
                        try:
                            self._write(items)
                        except Exception as exc:  # never let one write end the thread: answer and go on
                            self._failed(items, exc, protocol.E_INTERNAL)
                        finally:
                            self._release(items)
                    self._interval_fsync()
                finally:
                    with self._cond:
                        self._busy = False
        finally:
            self._interval_fsync(force=True)
            try:
                self._writer.close()
            finally:
                self._close_dirs()

    def _close_dirs(self) -> None:
        for handle in (self._dir, self._lock_dir):
            if handle is not None:
                handle.close()

    def _refresh_dirs(self) -> None:
        """Before a write: the held directories are still at their names (one
        lstat each); walked again (no symlink followed) when they are not,
        after a rotation and every REWALK_SECONDS. If a directory was
        replaced, reopen the file and lock in the new one."""
        handles = [handle for handle in (self._dir, self._lock_dir) if handle is not None]
        now = time.monotonic()
        if now < self._rewalk_at and all(handle.still_named() for handle in handles):
            return
        changed = False
        for handle in handles:
            changed = handle.refresh() or changed
        self._rewalk_at = now + REWALK_SECONDS
        if changed:
            self._writer.reopen()

    def _write(self, items: List[Work], replies: Optional[List[List[bytes]]] = None) -> bool:
        """Write ``items``; their replies go on the ack queue, or into
        ``replies`` (write_now: then only if the write needs no wait; False:
        nothing done)."""
        now = replies is not None
        fsync = self.fsync_policy == "batch"
        started = time.perf_counter()
        try:
            self._refresh_dirs()
            items, refused = self._permitted(items)
            for work, error in refused:
                self._failed([work], error, error.code, replies)
            if not items:
                return True
            lines = [line for work in items for line in work.lines]
            if now:
                quick = self._writer.write_now(lines)
                if quick is None:
                    return False
                result = quick
            else:
                result = self._writer.write(lines, fsync=fsync)
        except protocol.ProtocolError as exc:  # a symlink planted since the last write, ...
            self._failed(items, exc, exc.code, replies)
            return True
        except OSError as exc:  # disk full, permissions, ...: never ack it
            code = protocol.E_FORBIDDEN_PATH if exc.errno in (errno.ELOOP, errno.ENOTDIR) else protocol.E_WRITE_FAILED
            self._failed(items, exc, code, replies)
            return True
        stats = self.stats
        self._last_write_seconds = elapsed = time.perf_counter() - started
        if result.rotations:
            self._rewalk_at = 0.0
        stats.latency.add(elapsed)
        stats.writes += 1
        stats.bytes_written += result.bytes
        stats.rotations += result.rotations
        stats.fsyncs += int(fsync)
        self._unsynced = not fsync
        lost = self._lost(result)
        if lost:
            # Written, but not all of it is in the file any more: never ack.
            self._failed(items, protocol.ProtocolError(protocol.E_BAD_OPTIONS, lost), protocol.E_BAD_OPTIONS, replies)
            return True
        stats.batches_written += len(items)
        stats.records_written += len(lines)
        acks = [work.envelope + [work.ok_reply] for work in items]
        if replies is None:
            self._acks.put_many(acks)
        else:
            replies += acks
        return True

    def _lost(self, result: Any) -> str:
        if result.skipped:
            return (f"{result.skipped} line(s) could not be encoded in {self.options.get('encoding')} "
                    "(unicode_error_policy = strict)")
        if self._max_rotations and result.rotations > self._max_rotations:
            return (f"this write rotated the file {result.rotations} times but backupCount = {self._max_rotations}: "
                    "rotation deleted lines it had just written (maxBytes too small for the batch)")
        return ""

    def _failed(self, items: List[Work], exc: BaseException, code: str = protocol.E_WRITE_FAILED,
                replies: Optional[List[List[bytes]]] = None) -> None:
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, protocol.ProtocolError) else exc.message
        for handle in (self._lock_dir, self._dir):
            if handle is not None:
                message = handle.explain(message)
        message = printable(message)
        stats = self.stats
        if message != stats.last_error or stats.write_errors % 1000 == 0:
            log.error("write to %s failed, %d message(s) not acknowledged: %s", printable(self.path), len(items),
                      message)
        stats.write_errors += 1
        stats.last_error = message
        self._count(code)
        errors = [work.envelope + [protocol.encode_error(code, message, seq=work.seq, id=work.id)] for work in items]
        if replies is None:
            self._acks.put_many(errors)
        else:
            replies += errors

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


WriterFactory = Callable[[Target, Dict[str, Any], Optional[Target], Optional[Authority]], FileWriter]


class Router:
    """Maps (path, options) to the file's writer, enforcing the daemon's policy.

    One file, one set of options: a client declaring other options for a
    file that is being served gets ``options_conflict`` (and its fallback),
    never silently the first client's options. Writers are kept in
    least-recently-used order; an idle one is closed after
    ``idle_file_seconds`` or when a new file needs its slot.
    """

    def __init__(self, config: Config, stats: DaemonStats, acks: Optional[AckQueue] = None,
                 budget: Optional[QueueBudget] = None, max_files: Optional[int] = None,
                 make_writer: Optional[WriterFactory] = None) -> None:
        """Writers reply through ``acks`` and share ``budget``;
        ``make_writer`` replaces the router's own factory (tests)."""
        self.stats = stats
        self.acks = acks
        self.budget = budget
        self.writers: "OrderedDict[str, FileWriter]" = OrderedDict()
        self._make_writer = make_writer or self._new_writer
        self._cache: Dict[Hashable, FileWriter] = {}
        self._closing: List[FileWriter] = []
        self.max_files = max_files or config.max_files
        self.reload(config)

    @property
    def peer_max_files(self) -> int:
        return min(self.config.peer_max_files, self.max_files)

    def reload(self, config: Config) -> None:
        self.config = config
        self.policy = PathPolicy(config.allowed_dirs, config.max_path_depth, config.allowed_dir_names)
        self.options_policy = OptionPolicy(config.allow_owner)
        self._cache.clear()  # every path is checked again under the new policy

    def route(self, path: str, options: Dict[str, Any], principal: Hashable = None,
              authority: Optional[Authority] = None, pid: Optional[int] = None) -> FileWriter:
        """The writer of ``path``; a new one is opened for ``principal``
        (its share of the files) with ``authority`` (what it may do itself).
        ``pid``: the sending process (the kernel's), one of those that
        declare the file's options."""
        key: Hashable
        try:
            key = (path, tuple(options.items()))
            writer = self._cache.get(key)
        except TypeError:  # a list value (owner): use the canonical form
            key = (path, protocol.options_key(options))
            writer = self._cache.get(key)
        if writer is None:
            writer = self._resolve(path, options, principal, authority)
            if len(self._cache) > 16 * self.max_files:
                self._cache.clear()
            self._cache[key] = writer
        writer.last_used = time.monotonic()
        writer.declared_by(pid)
        self.writers.move_to_end(writer.path)
        return writer

    def _resolve(self, path: str, options: Dict[str, Any], principal: Hashable = None,
                 authority: Optional[Authority] = None) -> FileWriter:
        opts = self.options_policy.check(options)
        target = self.policy.target(path)
        lock_target = None
        if "lock_file_directory" in opts:
            lock_target = self.policy.target(os.path.join(opts["lock_file_directory"], "x"), "lock_file_directory")
            lock_target = Target(lock_target.root, lock_target.dirs)
        real = target.path
        writer = self.writers.get(real)
        if writer is not None:
            if protocol.options_key(opts) == writer.options_key:
                return writer
            self._change_options(writer, opts)  # raises unless every process that declared them is gone
        if principal is not None:
            # Fair share: a peer whose files are all busy (stalled on locks it
            # holds, say) is told busy; nobody else's slots are taken from them.
            held = sum(1 for w in self.writers.values() if w.opener == principal)
            if held >= self.peer_max_files and not self._close_least_recently_used(principal):
                self.stats.count("peer_files_refused")
                raise protocol.ProtocolError(
                    protocol.E_BUSY, f"this peer holds peer_max_files = {self.peer_max_files} files and none is idle")
        if len(self.writers) >= self.max_files and not self._close_least_recently_used():
            raise protocol.ProtocolError(
                protocol.E_BUSY, f"this daemon serves at most {self.max_files} files at once and none is idle")
        try:
            writer = self._make_writer(target, opts, lock_target, authority)
        except (KeyError, ValueError) as exc:  # unknown owner user or group, ...
            raise protocol.ProtocolError(protocol.E_BAD_OPTIONS, f"cannot serve {real}: {exc}") from None
        except OSError as exc:  # permissions, a file where a directory should be, ...
            raise protocol.ProtocolError(protocol.E_WRITE_FAILED, f"cannot open {real}: {exc}") from None
        writer.opener = principal
        self.writers[real] = writer
        log.info("serving %s with %s", printable(real), printable(str(opts)))
        return writer

    def _new_writer(self, target: Target, options: Dict[str, Any], lock_target: Optional[Target],
                    authority: Optional[Authority] = None) -> FileWriter:
        """A started writer for ``target``; a file closed while idle and opened again keeps its totals."""
        cfg = self.config
        path = target.path
        old = self.stats.files.get(path)
        stats = FileStats(path, options, cfg.queue_batches)
        if old is not None:
            stats.carry_over(old)
        policy, interval = cfg.fsync_for(path)
        assert self.acks is not None, "a router without an ack queue cannot make writers"
        writer = FileWriter(target, options, stats, self.acks, cfg.queue_batches, cfg.max_write_chars, policy,
                            interval, lock_target, self.stats.count, self.budget, cfg.queue_bytes, authority)
        writer.start()
        self.stats.add_file(stats, self.writers, keep=2 * self.max_files)
        return writer

    def _change_options(self, writer: FileWriter, opts: Dict[str, Any]) -> None:
        """Other options for a file being served. While a process that
        declared the served ones still runs, they stay: an options_conflict
        naming both sets (that process writes and rotates by them). Once all
        of them are gone (a rolling redeploy replaced them), the new
        declaration wins: the writer closes, once its queue is written, and
        the caller opens the file again with the new options."""
        live = writer.live_declarers()
        differ = sorted(k for k in set(opts) | set(writer.options) if opts.get(k) != writer.options.get(k))
        if live:
            writer.stats.option_conflicts += 1
            shown = ", ".join(str(pid) for pid in live[:5] if pid > 0) or "tcp peers"
            raise protocol.ProtocolError(
                protocol.E_OPTIONS_CONFLICT,
                f"{writer.path} is served with other options ({', '.join(differ)} differ) declared by processes "
                f"still running ({shown}{', ...' if len(live) > 5 else ''}): served {writer.options}, "
                f"this batch {opts}")
        if not writer.idle:
            raise protocol.ProtocolError(
                protocol.E_BUSY, f"{writer.path}: writing what was queued with its previous options first")
        self.stats.count("option_changes")
        log.info("%s: every process that declared %s is gone; now serving it with %s", printable(writer.path),
                 printable(str(writer.options)), printable(str(opts)))
        self._close(writer.path)

    def _close_least_recently_used(self, principal: Hashable = None) -> bool:
        """Close the least recently used idle writer (of ``principal``'s, if given)."""
        for path, writer in self.writers.items():
            if writer.idle and (principal is None or writer.opener == principal):
                self._close(path)
                return True
        return False

    def close_idle(self, idle_seconds: float) -> int:
        """Close writers unused for ``idle_seconds`` (their descriptors and thread come back)."""
        if idle_seconds <= 0:
            return 0
        cutoff = time.monotonic() - idle_seconds
        old = [p for p, w in self.writers.items() if w.last_used < cutoff and w.idle]
        for path in old:
            self._close(path)
        self._closing = [w for w in self._closing if not w.join(0)]
        return len(old)

    def _close(self, path: str) -> None:
        writer = self.writers.pop(path)
        writer.stop()
        self._closing.append(writer)
        self._cache.clear()
        self.stats.count("files_closed")
        log.debug("closed idle file %s", printable(path))

    def all_writers(self) -> List[FileWriter]:
        """Open writers and the ones still finishing after being closed."""
        return list(self.writers.values()) + self._closing

    def stop_all(self) -> None:
        for writer in self.all_writers():
            writer.stop()

    def join_all(self, deadline: float) -> Tuple[int, int]:
        """Wait for the writers until ``deadline``; (finished, still running)."""
        done = 0
        writers = self.all_writers()
        for writer in writers:
            if writer.join(max(0.0, deadline - time.monotonic())):
                done += 1
        return done, len(writers) - done
