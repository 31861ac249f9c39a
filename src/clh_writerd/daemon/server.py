"""The daemon's lifecycle: startup(), main_loop(), shutdown().

The main loop owns the ROUTER socket. For each frame it runs the daemon's
stages: ``decode`` (protocol), ``route`` (Router -> FileWriter), and hands
the work to the file's writer thread, which ``write``s and sends the ``ack``
back through an inproc PULL socket; the loop forwards it to the client.
Signal handlers only set flags.
"""

import ctypes
import dataclasses
import fcntl
import gc
import grp
import logging
import os
import resource
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections import OrderedDict
from typing import IO, Any, Callable, Dict, Hashable, List, Optional, Set, Tuple

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import protocol
from .._sockdir import key_file_problem, socket_dir_problem
from .._version import __version__
from .access import AccessPolicy, Peer
from .config import RESTART_ONLY, Config, load_config, metrics_warnings
from .dispatch import Dispatcher
from ..forward import Forwarder, options_from_config
from .errors import StartupError  # noqa: F401 (re-exported: `from .server import StartupError`)
from .metrics import METRICS_SHARE, MetricsServer
from .notify import SystemdNotifier
from .safefiles import proc_fd_available
from .stats import PEER_LOGGER, DaemonStats, printable
from .writers import AckQueue, QueueBudget, Router

log = logging.getLogger("clh_writerd.daemon")
peer_log = logging.getLogger(PEER_LOGGER)

EXIT_OK = 0
EXIT_DRAIN_TIMEOUT = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_FORCED = 130

POLL_MS = 200
# Frames handled per poll wake-up before acks get their turn.
MAX_BURST = 256
# Descriptors one served file may hold: its directory, the lock file's
# directory, the log stream and the lock stream.
FDS_PER_FILE = 4
# Descriptors kept for the daemon itself (zmq's own, stdio, config, metrics).
FD_RESERVE = 64
# The daemon's zmq sockets: the ROUTER (writers use no zmq socket).
ZMQ_MAX_SOCKETS = 16
# Connections that have not spoken yet that the guard remembers at least
# (their monitor events may be lost under a flood: the map stays bounded).
MAX_PENDING = 4096
# Connections gone since the last high-water mark before the daemon hands
# their freed memory back to the kernel (see ConnectionGuard.sweep).
TRIM_AFTER_CONNECTIONS = 256
# Replies queued per peer before zmq drops further ones for that peer (a
# client that never reads cannot grow the daemon's memory).
REPLY_HWM = 1000
# Replies up to this size (acks, pings, most errors) are bounded by REPLY_HWM
# alone: REPLY_HWM of them is half a megabyte. A larger one (stats, a long
# error) goes to a connection only if it has read what it was sent
# (unread_reply_bytes), and at most one per connection per receive burst.
SMALL_REPLY_BYTES = 512
# A built stats document answers every stats request of the same scope for
# this many times as long as it took to build: stats requests, however many,
# take at most about a tenth of the main loop (a cheap document is fresh).
STATS_CACHE_FACTOR = 10
# Scopes (peers) whose stats document is cached at most.
STATS_CACHE_SCOPES = 64
# Seconds between sweeps for idle files.
IDLE_SWEEP_SECONDS = 1.0
# The cycle collector's first threshold while serving (Python's default is
# 700). A batch of field values is two lists per record, alive from its
# unpacking until its lines (plain strings) are made: at 700 a collection
# ran inside nearly every batch, moved its lists to older generations and,
# with them, brought full collections; measured in the fields ingest
# (1,000,000 records, 500 per batch), 9-10 % of the main thread's CPU, and
# none at this threshold. The daemon's data is acyclic (freed by reference
# counting either way); the rare cycle (an exception's traceback) is still
# collected, after at most this many net allocations.
GC_THRESHOLD = 10_000


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return min(soft, hard) if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def derived_limits(nofile: int, max_files: int, max_connections: int) -> Dict[str, int]:
    """Files get at most half of the descriptors (FDS_PER_FILE each); connections
    what is left after the files' share and a reserve (libzmq aborts the
    process if accept() meets EMFILE, so connections must never take it all),
    at most max_connections (each costs libzmq about 30 KiB of memory)."""
    reserve = max(FD_RESERVE, nofile // 4)
    usable = max(0, nofile - reserve)
    files = max(1, min(max_files, usable // 2 // FDS_PER_FILE))
    connections = max(8, min(max_connections, usable - files * FDS_PER_FILE))
    return {"nofile": nofile, "max_files": files, "connections": connections,
            "fd_reserve": reserve, "zmq_max_sockets": ZMQ_MAX_SOCKETS, "reply_hwm": REPLY_HWM}


def receive_hwm(config: Config) -> int:
    """ZMQ_RCVHWM: the frames libzmq holds per connection, so that
    receive_buffer_bytes bounds its bytes (frames are at most hard_frame_limit)."""
    return max(1, config.receive_buffer_bytes // hard_frame_limit(config.max_message_bytes))


def unread_bytes(fd: int) -> int:
    """Bytes sent on a connection's socket that its peer has not read yet (SIOCOUTQ); 0 if unknown."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where the C library has none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]

    def run() -> None:
        trim(0)
    return run


def open_fds() -> int:
    """Descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class ConnectionGuard:
    """Keeps connections from taking the descriptors files and libzmq need.

    The ROUTER's socket monitor reports each accepted connection; if the
    process then holds more descriptors than the limits leave for
    connections (counted from /proc/self/fd, so nothing can drift), the new
    connection is shut down at once and counted. Stateless on purpose: a
    monitor event lost under a flood cannot skew it.
    """

    EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)

    def __init__(self, sock: zmq.Socket, limits: Dict[str, int], open_files: Callable[[], int],
                 stats: DaemonStats, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.monitor = sock.get_monitor_socket(self.EVENTS)
        self.limits = limits
        self.open_files = open_files
        self.stats = stats
        self.paused = False
        self.local_address: Any = None  # the listener's address: a descriptor is ours only if it has it
        # Connections accepted that have not sent a message yet (descriptor ->
        # when accepted), oldest first: the first shut down when connections
        # are short, so silent tcp connections (a CURVE handshake never
        # started) cannot keep an authenticated client out. libzmq itself
        # drops those still handshaking after handshake_timeout (HANDSHAKE_IVL).
        self.pending: "OrderedDict[int, float]" = OrderedDict()
        self._pause, self._resume = pause, resume
        self._base = self._high = open_fds()  # the daemon's own descriptors: no connection yet
        self._trim = _malloc_trim()

    def check(self) -> None:
        """Stop listening while descriptors are short, listen again once half the reserve is back:
        a paused listener accepts nothing, so a connection flood cannot reach EMFILE. The
        max_connections cap alone never pauses (unbinding drops every connection): the
        connections beyond it are shut down one by one."""
        fds = open_fds()
        ceiling = self.descriptor_ceiling()
        if not self.paused and fds > ceiling:
            self.paused = True
            self.stats.count("listener_paused")
            self._pause()
        elif self.paused and fds < ceiling - self.limits["fd_reserve"] // 2:
            self.paused = False
            self._resume()

    def sweep(self) -> None:
        """Listen again if paused; after many connections went away, return their memory.

        Each connection costs libzmq about 30 KiB, freed on close but kept by
        malloc in libzmq's I/O thread's arena: after a flood of thousands of
        connections the daemon would stay at its peak size for good.
        """
        if self.paused:
            self.check()
        fds = open_fds()
        self._high = max(self._high, fds)
        if self._high - fds >= TRIM_AFTER_CONNECTIONS:
            self._trim()
            self._high = fds

    def descriptor_ceiling(self) -> int:
        """Descriptors the process may hold after an accept: all but the reserve and the free file slots."""
        free_slots = max(0, self.limits["max_files"] - self.open_files())
        return self.limits["nofile"] - self.limits["fd_reserve"] - free_slots * FDS_PER_FILE

    def ceiling(self) -> int:
        """The descriptor ceiling, or fewer: the daemon's own, the open files' and max_connections."""
        cap = self._base + self.open_files() * FDS_PER_FILE + self.limits["connections"]
        return min(self.descriptor_ceiling(), cap)

    def handle(self) -> None:
        """Read the accept events; shut down the newest connections beyond the ceiling; pause if short."""
        accepted = []
        pending = self.pending
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind, fd = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                accepted.append(fd)
                pending.pop(fd, None)
                pending[fd] = time.monotonic()
            elif kind == zmq.EVENT_DISCONNECTED:
                pending.pop(fd, None)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # Closed mid-handshake: handshake_timeout (HANDSHAKE_IVL) ran out, or it was shut down.
                # (The value of handshake events is not the descriptor.)
                self.stats.count("handshakes_incomplete")
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                # tcp with CURVE: a key not in curve_public_keys_dir, or no
                # CURVE at all (libzmq closes that connection itself).
                self.stats.count("auth_failures")
                peer_log.warning("refused a tcp connection: CURVE handshake failed (%s)",
                            "unknown client key" if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                            else "no or bad CURVE")
        # Events lost under a flood leave stale entries: keep the map bounded.
        while len(pending) > max(MAX_PENDING, 2 * self.limits["connections"]):
            pending.popitem(last=False)
        if not accepted:
            return
        fds = open_fds()  # one /proc listing per wake-up, not per event
        self._high = max(self._high, fds)
        excess = fds - self.ceiling()
        # Connections that have sent nothing go first, oldest first (what
        # proved nothing yet); then, as before, the newest accepted.
        shut = set()
        while excess > 0 and pending:
            fd, _ = pending.popitem(last=False)
            if self._shut(fd, self.local_address):
                shut.add(fd)
                excess -= 1
        for fd in reversed(accepted):
            if excess <= 0:
                break
            if fd not in shut and self._shut(fd, self.local_address):
                shut.add(fd)
                excess -= 1
        self.stats.count("connections_refused", len(shut))
        self.check()

    @staticmethod
    def _shut(fd: int, local_address: Any = None) -> bool:
        """shutdown(2), not close: libzmq owns the descriptor, sees the end of
        the stream and closes it itself. Only a socket on the listener's
        address (``local_address``, when known) is touched: a descriptor from
        a lost event may name something else by now. True if shut down."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return False  # already closed and reused by something that is not a socket
        try:
            if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
                return False
            if local_address is not None:
                name = sock.getsockname()
                if (name[1] if isinstance(name, tuple) else name) != local_address:
                    return False
            sock.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            sock.detach()

    def close(self) -> None:
        self.monitor.close(linger=0)


def hard_frame_limit(max_message_bytes: int) -> int:
    """ZMQ_MAXMSGSIZE: frames up to twice the configured limit reach Python,
    where they are refused with a reply and counted; larger ones make libzmq
    drop the connection before the bytes are buffered (not counted)."""
    return min(2 * max_message_bytes, 2 * protocol.MAX_FRAME_BYTES)


class Server:
    """One clh-writerd instance bound to one endpoint."""

    def __init__(self, config: Config, config_path: Optional[str] = None) -> None:
        self.config = config
        self.config_path = config_path
        self.stats = DaemonStats(config.endpoint, config.max_clients, config.clients_gone_after)
        self.context: Optional[zmq.Context] = None
        self.router_socket: Optional[zmq.Socket] = None
        self.acks: Optional[AckQueue] = None
        self.guard: Optional[ConnectionGuard] = None
        self.router: Optional[Router] = None
        self._lock_file: Optional[IO[str]] = None
        self._next_sweep = 0.0
        self.should_exit = False
        self.force_exit = False
        self.reload_requested = False
        self._writers_running = False
        self.dispatcher: Optional[Dispatcher] = None
        self._old_handlers: List[Any] = []
        self._old_gc_threshold: Optional[Tuple[int, ...]] = None
        self.notifier = SystemdNotifier()
        self.metrics: Optional[Any] = None
        self.forwarder: Optional[Any] = None  # forward.Forwarder when [forward] target is set
        self.access = AccessPolicy(config, config.ipc_path is not None)
        self.authenticator: Optional[Any] = None  # zmq.auth ThreadAuthenticator on a CURVE tcp endpoint
        self.budget = QueueBudget(config.total_queue_bytes, config.peer_queue_bytes)
        # Stats documents by scope: (valid until, packed document).
        self._stats_cache: Dict[Hashable, Tuple[float, bytes]] = {}
        # Connections (descriptor, routing identity) sent a large reply in this receive burst (one each).
        self._large_replies: Set[Tuple[int, bytes]] = set()

    # -- lifecycle -----------------------------------------------------------
    def run(self) -> int:
        """startup, main loop, shutdown; returns the process exit code."""
        try:
            self.startup()
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            self._release()
            return EXIT_STARTUP
        try:
            self.main_loop()
        finally:
            code = self.shutdown()
        return code

    def startup(self) -> None:
        cfg = self.config
        if not proc_fd_available():
            raise StartupError("/proc/self/fd is not available: the daemon needs it to write without "
                               "following symlinks (mount /proc)")
        self.stats.limits = derived_limits(raise_fd_limit(), cfg.max_files, cfg.max_connections)
        self._prepare_allowed_dirs()
        self.context = zmq.Context()
        self.context.MAX_SOCKETS = ZMQ_MAX_SOCKETS
        self.acks = AckQueue()
        self.router = Router(cfg, self.stats, self.acks, self.budget, self.stats.limits["max_files"])
        self.dispatcher = Dispatcher(cfg, self.stats, self.access, self.router, lambda: self.should_exit,
                                     self._stats_document, self._may_send_large)
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, hard_frame_limit(cfg.max_message_bytes))
        sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
        # A reply that cannot be queued (the peer's REPLY_HWM is reached, or
        # the peer is gone) raises instead of vanishing, so _send counts it.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # In bytes terms: what libzmq buffers per connection while the main
        # loop is busy is at most receive_buffer_bytes.
        self.stats.limits["rcvhwm"] = receive_hwm(cfg)
        sock.setsockopt(zmq.RCVHWM, self.stats.limits["rcvhwm"])
        # A connection that has not finished its handshake (CURVE on tcp) in time is dropped.
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(cfg.handshake_timeout * 1000))
        sock.setsockopt(zmq.LINGER, 1000)
        # Let zmq drop state of peers that vanished without closing.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        self.router_socket = sock
        self.guard = ConnectionGuard(sock, self.stats.limits, lambda: len(self.router.writers) if self.router else 0,
                                     self.stats, self._pause_listening, self._resume_listening)
        self._secure(sock)
        self._bind(sock)
        self.guard.local_address = self._local_address(sock)
        RateLimit.attach(cfg.log_rate_limit, self.stats.count)
        if cfg.metrics_listen:
            self.metrics = MetricsServer(cfg.metrics_listen, self._metrics_snapshot, per_client=cfg.metrics_per_client,
                                         sees_all=lambda uid: self.access.admin_uid(uid), public=cfg.metrics_public)
            log.info("metrics on http://%s/metrics", cfg.metrics_listen)
            for warning in metrics_warnings(cfg):
                log.warning("%s", warning)
        if cfg.forward_target:
            try:
                self.forwarder = Forwarder(options_from_config(cfg))
            except (RuntimeError, OSError) as exc:  # e.g. an unreadable checkpoint
                raise StartupError(f"forward: {exc}") from None
            self.forwarder.start()
        self._install_signal_handlers()
        self._tune_collector()
        self.notifier.ready(f"serving {cfg.endpoint}")
        log.info(
            "clh-writerd %s serving %s (pid %d, config %s); allowed dirs: %s",
            __version__, cfg.endpoint, os.getpid(), cfg.source, ", ".join(cfg.allowed_dirs),
        )
        log.info("limits: %s", ", ".join(f"{k}={v}" for k, v in self.stats.limits.items()))

    def main_loop(self) -> None:
        poller = zmq.Poller()
        assert self.router_socket is not None and self.acks is not None
        poller.register(self.router_socket, zmq.POLLIN)
        ack_fd = self.acks.fileno()
        poller.register(ack_fd, zmq.POLLIN)
        assert self.guard is not None
        poller.register(self.guard.monitor, zmq.POLLIN)
        while not self.should_exit:
            self.notifier.watchdog()
            events = dict(poller.poll(POLL_MS))
            if self.guard.monitor in events:
                self.guard.handle()
            if ack_fd in events:
                self._forward_acks()
            if self.router_socket in events:
                self._receive_burst()
            if self.reload_requested:
                self.reload()
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + IDLE_SWEEP_SECONDS
                self._sweep()

    def shutdown(self) -> int:
        """Write and acknowledge everything received, within drain_timeout."""
        started = time.monotonic()
        deadline = started + self.config.drain_timeout
        code = EXIT_OK
        queued = sum(w.stats.queue_depth for w in self.router.all_writers()) if self.router else 0
        log.info("stopping: draining %d queued message(s) (timeout %.1fs)", queued, self.config.drain_timeout)
        self.notifier.stopping(f"draining {queued} queued message(s)")
        if self.router is not None:
            self.router.stop_all()
            while not self.force_exit:
                self.notifier.watchdog()
                running = [w for w in self.router.all_writers() if not w.join(0)]
                self._forward_acks(wait_ms=20)
                if not running:
                    break
                if time.monotonic() > deadline:
                    log.error("drain timed out after %.1fs; %d file(s) still writing", self.config.drain_timeout, len(running))
                    code = EXIT_DRAIN_TIMEOUT
                    break
            self._forward_acks()
        if self.force_exit:
            code = EXIT_FORCED
        self._writers_running = code != EXIT_OK
        written = sum(f.records_written for f in self.stats.files.values())
        log.info("stopped after %.2fs: %d record(s) written in this run", time.monotonic() - started, written)
        self._release()
        return code

    def reload(self) -> None:
        """SIGHUP: re-read the config file; allowed dirs, per-file settings and limits apply live."""
        self.reload_requested = False
        if self.config_path is None:
            log.info("reload: running on the embedded default, nothing to reload")
            return
        try:
            new = load_config(self.config_path)
        except ValueError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        if new.endpoint != self.config.endpoint:
            log.warning("reload: endpoint change to %s needs a restart; keeping %s", new.endpoint, self.config.endpoint)
            new = dataclasses.replace(new, endpoint=self.config.endpoint)
        for key in RESTART_ONLY:
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect after a restart", key)
                new = dataclasses.replace(new, **{key: getattr(self.config, key)})
        if new.log_level != self.config.log_level:
            logging.getLogger("clh_writerd").setLevel(new.log_level.upper())
        self.config = new
        self.access = AccessPolicy(new, new.ipc_path is not None)
        if self.dispatcher is not None:
            self.dispatcher.config, self.dispatcher.access = new, self.access
        if self.authenticator is not None:
            problem = self._keys_problem(new)
            if problem:  # a key planted in a directory someone else can write is never admitted
                log.error("reload: keeping the admitted keys: %s", problem)
            else:
                self.authenticator.configure_curve(domain="*", location=new.curve_public_keys_dir)
        self._prepare_allowed_dirs()
        assert self.router is not None and self.router_socket is not None
        self.stats.limits = derived_limits(self.stats.limits.get("nofile", raise_fd_limit()), new.max_files,
                                           new.max_connections)
        self.router.max_files = self.stats.limits["max_files"]
        if self.guard is not None:
            self.guard.limits = self.stats.limits
        self.router.reload(new)
        self.router_socket.setsockopt(zmq.MAXMSGSIZE, hard_frame_limit(new.max_message_bytes))
        # RCVHWM stays as set at start (receive_buffer_bytes is restart-only): libzmq applies a new HWM to
        # the pipes of live connections from this thread while its I/O thread uses them (it crashed the
        # daemon, SIGSEGV, in 4 of 10 reloads).
        self.stats.limits["rcvhwm"] = int(self.router_socket.getsockopt(zmq.RCVHWM))
        self.router_socket.setsockopt(zmq.HANDSHAKE_IVL, int(new.handshake_timeout * 1000))
        self.budget.total_limit, self.budget.peer_limit = new.total_queue_bytes, new.peer_queue_bytes
        self._stats_cache.clear()
        RateLimit.attach(new.log_rate_limit, self.stats.count)
        for writer in self.router.all_writers():
            writer.fsync_policy, writer.fsync_interval = new.fsync_for(writer.path)
            writer.capacity = writer.stats.capacity = new.queue_batches
            writer.byte_capacity = new.queue_bytes
        self.stats.max_clients = new.max_clients
        self.stats.clients_gone_after = new.clients_gone_after
        self.stats.count("reloads")
        log.info("reloaded %s; allowed dirs: %s", new.source, ", ".join(new.allowed_dirs))

    # -- stages ------------------------------------------------------------
    def _receive_burst(self) -> None:
        sock = self.router_socket
        assert sock is not None
        self._large_replies.clear()
        guard, dispatcher = self.guard, self.dispatcher
        assert dispatcher is not None
        for _ in range(MAX_BURST):
            # Asked before each receive: a receive that finds nothing raises
            # zmq.Again, whose construction cost more than a ping's handling.
            if not int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # Who sent it, from the transport: the kernel's credentials on
            # ipc, the admitted CURVE key on tcp; and on which connection
            # (its descriptor: how much of our replies it has left unread).
            last = parts[-1]
            peer = Peer.from_metadata(str(last.get("Peer-Address") or ""), self._user_id(last))
            fd = self._source_fd(last)
            if guard is not None:
                guard.pending.pop(fd, None)  # it spoke: no longer the first to go
            # The payload is read in place (a memoryview of libzmq's buffer): no copy of a
            # frame that may be megabytes and is often refused.
            for reply, reply_fd in dispatcher.handle([p.bytes for p in parts[:-1]] + [last.buffer], peer, fd):
                self._send(reply, reply_fd)

    @staticmethod
    def _source_fd(frame: zmq.Frame) -> int:
        try:
            return int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, AttributeError, TypeError, ValueError):
            return -1

    def _user_id(self, frame: zmq.Frame) -> Optional[str]:
        if self.authenticator is None:
            return None
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:
            return None

    def _pause_listening(self) -> None:
        assert self.router_socket is not None
        peer_log.warning("descriptors nearly exhausted: not accepting connections until some close")
        try:
            self.router_socket.unbind(self.config.endpoint)
        except zmq.ZMQError as exc:
            log.error("cannot pause the listener: %s", exc)

    def _resume_listening(self) -> None:
        assert self.router_socket is not None
        try:
            self._listen(self.router_socket)
            peer_log.info("accepting connections again")
        except (StartupError, OSError, zmq.ZMQError) as exc:
            log.error("cannot listen again (will retry): %s", exc)
            assert self.guard is not None
            self.guard.paused = True

    def _sweep(self) -> None:
        """Close idle files; forget expired busy entries; listen again when descriptors came back
        and return a flood's memory."""
        assert self.router is not None
        self.router.close_idle(self.config.idle_file_seconds)
        self.stats.fold_gone()
        if self.guard is not None:
            self.guard.sweep()
        if self.dispatcher is not None:
            self.dispatcher.sweep(time.monotonic())

    def _forward_acks(self, wait_ms: int = 0) -> None:
        acks = self.acks
        assert acks is not None
        if wait_ms:
            zmq.select([acks.fileno()], [], [], wait_ms / 1000.0)
        for frames in acks.drain():
            self._send(frames)

    def _send(self, frames: List[bytes], fd: int = -1) -> None:
        assert self.router_socket is not None
        if fd >= 0 and len(frames[-1]) > SMALL_REPLY_BYTES:
            if not self._may_send_large(fd, frames[0]):
                self.stats.count("replies_dropped")
                return
            self._large_replies.add((fd, frames[0]))
        try:
            self.router_socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            # The peer is gone or has REPLY_HWM replies unread: dropped on
            # purpose (never wait for one client) and counted; the client
            # resends what it has not seen acknowledged.
            self.stats.count("replies_dropped")

    def _may_send_large(self, fd: int, identity: bytes) -> bool:
        """A large reply only to a connection that has read what it was sent
        (its socket holds at most unread_reply_bytes), one per burst: so a
        peer that does not read holds at most one large reply in libzmq.
        (The routing identity tells two connections apart that had the same
        descriptor number in one burst.)"""
        return ((fd, identity) not in self._large_replies
                and unread_bytes(fd) <= self.config.unread_reply_bytes)

    def _stats_document(self, scope: Hashable) -> bytes:
        """The packed stats document for ``scope`` (None: everything), at most
        stats_max_bytes; reused for STATS_CACHE_FACTOR times its build time."""
        now = time.monotonic()
        cached = self._stats_cache.get(scope)
        if cached is not None and cached[0] > now:
            return cached[1]
        packed = msgpack.packb(self.snapshot(scope, self.config.stats_max_bytes))
        if len(self._stats_cache) >= STATS_CACHE_SCOPES:
            self._stats_cache.clear()
        built = time.monotonic()
        self._stats_cache[scope] = (built + STATS_CACHE_FACTOR * (built - now), packed)
        return packed

    def _metrics_snapshot(self) -> dict:
        """What a scrape is built from (the metrics thread): everything, so that the scrape stays within
        about stats_max_bytes (metrics.METRICS_SHARE)."""
        return self.snapshot(None, max(16 * 1024, self.config.stats_max_bytes // METRICS_SHARE))

    def snapshot(self, scope: Hashable = None, budget: int = 0) -> dict:
        """The stats document (``scope``, ``budget``: DaemonStats.snapshot)."""
        doc = self.stats.snapshot(scope, budget)
        if self.forwarder is not None and scope is None:
            doc["forward"] = self.forwarder.snapshot()
        return doc

    # -- resources -----------------------------------------------------------
    def _prepare_allowed_dirs(self) -> None:
        for directory in self.config.allowed_dirs:
            if not os.path.isdir(directory):
                if not self.config.create_allowed_dirs:
                    log.warning("allowed dir %s does not exist", directory)
                    continue
                try:
                    os.makedirs(directory, exist_ok=True)
                except OSError as exc:
                    raise StartupError(f"cannot create allowed dir {directory}: {exc}") from None

    def _bind(self, sock: zmq.Socket) -> None:
        path = self.config.ipc_path
        if path is not None:
            self._prepare_socket_dir(os.path.dirname(path))
            self._take_lock(path + ".lock")
            if os.path.exists(path):  # left by a daemon that was killed
                os.unlink(path)
        self._listen(sock)

    def _listen(self, sock: zmq.Socket) -> None:
        """bind, then give the ipc socket file the directory's permissions."""
        endpoint = self.config.endpoint
        path = self.config.ipc_path
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise StartupError(f"cannot bind {endpoint}: {exc}") from None
        if path is not None:
            # Connecting needs write permission on the socket file, which the
            # umask may have removed: the directory's mode decides who gets in.
            os.chmod(path, 0o660 if self.config.socket_group else 0o600)
            if self.config.socket_group:
                os.chown(path, -1, self._socket_gid())

    def _local_address(self, sock: zmq.Socket) -> Any:
        """The listener's address as getsockname() shows it on an accepted
        connection: the socket path on ipc, the port on tcp."""
        path = self.config.ipc_path
        if path is not None:
            return path
        try:
            return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        except (zmq.ZMQError, ValueError, IndexError):
            return None

    def _prepare_socket_dir(self, directory: str) -> None:
        """Create the directory (socket_dir_mode), or refuse one that someone
        else controls: its owner could move the socket aside and listen in
        the daemon's place (the rule of _sockdir, which clients apply too)."""
        cfg = self.config
        group = self._socket_gid() if cfg.socket_group else None
        try:
            if not os.path.lexists(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            problem = socket_dir_problem(directory, {os.getuid(), 0}, group)
            if problem:
                raise StartupError(f"refusing to serve from {directory}: {problem}; remove it or fix its owner "
                                   "and mode (socket_dir_mode, socket_group)")
            st = os.stat(directory)
            if st.st_uid == os.getuid():
                if group is not None:
                    os.chown(directory, -1, group)
                os.chmod(directory, cfg.socket_dir_mode)
        except OSError as exc:
            raise StartupError(f"cannot prepare socket directory {directory}: {exc}") from None

    def _secure(self, sock: zmq.Socket) -> None:
        """tcp: CURVE with a ZAP handler that admits the keys in curve_public_keys_dir."""
        cfg = self.config
        if cfg.ipc_path is not None:
            return
        if cfg.tcp_auth == "none":
            log.warning("tcp_auth = \"none\": anyone who can reach %s may write into every allowed directory "
                        "and read the stats", cfg.endpoint)
            return
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        problem = self._keys_problem(cfg)
        if problem:
            raise StartupError(problem)
        try:
            public, secret = zmq.auth.load_certificate(cfg.curve_secret_key)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot load curve_secret_key {cfg.curve_secret_key}: {exc}") from None
        if not secret:
            raise StartupError(f"curve_secret_key {cfg.curve_secret_key} holds no secret key "
                               "(use the .key_secret file of clh-writerd keygen)")
        if not os.path.isdir(cfg.curve_public_keys_dir):
            raise StartupError(f"curve_public_keys_dir {cfg.curve_public_keys_dir} is not a directory")
        assert self.context is not None
        self.authenticator = ThreadAuthenticator(self.context, log=logging.getLogger("clh_writerd.daemon.zap"))
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=cfg.curve_public_keys_dir)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        log.info("tcp: CURVE; client keys from %s", cfg.curve_public_keys_dir)

    @staticmethod
    def _keys_problem(cfg: Config) -> str:
        """The key files as ssh checks them: the secret key and the admitted keys' directory (and each
        key in it) owned by this user or root, writable by nobody else; the secret key readable by nobody else."""
        trusted = {os.getuid(), 0}
        problem = key_file_problem(cfg.curve_secret_key, trusted, secret=True)
        if not problem and os.path.isdir(cfg.curve_public_keys_dir):
            problem = socket_dir_problem(cfg.curve_public_keys_dir, trusted).replace("socket directory",
                                                                                      "curve_public_keys_dir")
            for name in sorted(os.listdir(cfg.curve_public_keys_dir)) if not problem else ():
                if name.endswith(".key"):
                    problem = key_file_problem(os.path.join(cfg.curve_public_keys_dir, name), trusted, secret=False)
                    if problem:
                        break
        return problem

    def _socket_gid(self) -> int:
        group = self.config.socket_group
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid

    def _take_lock(self, lock_path: str) -> None:
        """One daemon per endpoint: the lock is taken before bind, since an
        ipc bind would silently take the socket over from a running daemon."""
        try:
            f = open(lock_path, "a+")
        except OSError as exc:
            raise StartupError(f"cannot open lock file {lock_path}: {exc}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise StartupError(
                f"another clh-writerd (pid {holder}) is already serving {self.config.endpoint}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    def _install_signal_handlers(self) -> None:
        for sig, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                             (signal.SIGHUP, self._on_reload)):
            self._old_handlers.append((sig, signal.signal(sig, handler)))

    def _tune_collector(self) -> None:
        """GC_THRESHOLD while serving; what startup made (modules, config)
        frozen out of the collections that still run."""
        self._old_gc_threshold = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *self._old_gc_threshold[1:])

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self.should_exit and signum == signal.SIGINT:
            self.force_exit = True  # second Ctrl-C: stop draining
        self.should_exit = True

    def _on_reload(self, signum: int, frame: Any) -> None:
        self.reload_requested = True

    def _release(self) -> None:
        if self.forwarder is not None:
            self.forwarder.stop(timeout=self.config.drain_timeout)
            self.forwarder = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.notifier.close()
        for sig, handler in self._old_handlers:
            signal.signal(sig, handler)
        self._old_handlers = []
        if self._old_gc_threshold is not None:
            gc.set_threshold(*self._old_gc_threshold)
            gc.unfreeze()
            self._old_gc_threshold = None
        if self.guard is not None:
            self.router_socket.disable_monitor() if self.router_socket is not None else None
            self.guard.close()
            self.guard = None
        if self.router_socket is not None:
            self.router_socket.close(linger=1000)
        self.router_socket = None
        if self.acks is not None and not self._writers_running:
            self.acks.close()
            self.acks = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        if self.context is not None:
            self.context.term()  # writers hold no zmq socket: nothing can make this wait
        self.context = None
        path = self.config.ipc_path
        if self._lock_file is not None:
            if path is not None and os.path.exists(path):
                os.unlink(path)
            self._lock_file.close()
            self._lock_file = None


class EscapingFormatter(logging.Formatter):
    """One event, one line: control characters in the message (paths, names
    and errors that came from clients) are escaped, so no client can forge a
    log line or send terminal escapes to whoever reads the log."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class RateLimit(logging.Filter):
    """At most ``rate`` lines a second (a burst of as many) of what clients can
    provoke (PEER_LOGGER), the rest counted: a client that provokes a warning
    per message cannot flood the journal.
    The next line let through says how many were suppressed. Thread-safe
    (writer threads log too)."""

    def __init__(self, rate: int = 0, count: Callable[[str, int], None] = lambda name, n: None) -> None:
        super().__init__()
        self.rate, self._count = rate, count
        self._tokens = float(rate)
        self._last = time.monotonic()
        self.suppressed = 0
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, rate: int, count: Callable[..., None]) -> None:
        """Set the rate and counter of the filter configure_logging installed (if any)."""
        for handler in logging.getLogger("clh_writerd").handlers:
            for f in handler.filters:
                if isinstance(f, cls):
                    f.rate, f._count = rate, count

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.rate or not record.name.startswith(PEER_LOGGER):
            return True
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                self.suppressed += 1
                self._count("log_lines_suppressed", 1)
                return False
            self._tokens -= 1.0
            if self.suppressed:
                record.msg = f"({self.suppressed} line(s) suppressed by log_rate_limit) {record.msg}"
                self.suppressed = 0
        return True


def configure_logging(level: str, rate_limit: int = 0) -> None:
    """The daemon's own diagnostics: stderr, one line per event, with levels,
    at most ``rate_limit`` lines a second (0: no limit)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s clh-writerd[%(process)d]: %(message)s"))
    handler.addFilter(RateLimit(rate_limit))
    root = logging.getLogger("clh_writerd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
