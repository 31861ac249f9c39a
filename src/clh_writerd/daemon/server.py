"""The daemon's lifecycle: startup(), main_loop(), shutdown(), reload().

The listener (``listener.Listener``) opens, binds and guards the ROUTER
socket; the main loop receives from it and hands each message to the
dispatcher (``dispatch.Dispatcher``: decode -> admit -> route -> busy check
-> render -> submit), sends the replies it returns, and forwards the acks
the file writers' threads put on the ack queue. Signal handlers only set
flags.
"""

import dataclasses
import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Hashable, List, Optional, Set, Tuple

import msgpack
import zmq

from .._version import __version__
from .access import AccessPolicy, Peer
from .config import RESTART_ONLY, Config, load_config, metrics_warnings
from .dispatch import Dispatcher
from .listener import ZMQ_MAX_SOCKETS, Listener, derived_limits, raise_fd_limit, unread_bytes
from ..forward import Forwarder, options_from_config
from .errors import StartupError  # noqa: F401 (re-exported: `from .server import StartupError`)
from .metrics import METRICS_SHARE, MetricsServer
from .notify import SystemdNotifier
from .safefiles import proc_fd_available
from .stats import PEER_LOGGER, DaemonStats, printable
from .writers import AckQueue, QueueBudget, Router

log = logging.getLogger("clh_writerd.daemon")

EXIT_OK = 0
EXIT_DRAIN_TIMEOUT = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_FORCED = 130

POLL_MS = 200
# Frames handled per poll wake-up before acks get their turn.
MAX_BURST = 256
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


class Server:
    """One clh-writerd instance bound to one endpoint."""

    def __init__(self, config: Config, config_path: Optional[str] = None) -> None:
        self.config = config
        self.config_path = config_path
        self.stats = DaemonStats(config.endpoint, config.max_clients, config.clients_gone_after)
        self.context: Optional[zmq.Context] = None
        self.listener: Optional[Listener] = None
        self.router_socket: Optional[zmq.Socket] = None
        self.acks: Optional[AckQueue] = None
        self.router: Optional[Router] = None
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
        self.listener = Listener(cfg, self.stats, self.context, lambda: len(self.router.writers) if self.router else 0)
        self.router_socket = self.listener.open()
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
        assert self.listener is not None
        guard = self.listener.guard
        assert guard is not None
        poller.register(guard.monitor, zmq.POLLIN)
        while not self.should_exit:
            self.notifier.watchdog()
            events = dict(poller.poll(POLL_MS))
            if guard.monitor in events:
                guard.handle()
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
        self._prepare_allowed_dirs()
        assert self.router is not None and self.listener is not None
        self.stats.limits = derived_limits(self.stats.limits.get("nofile", raise_fd_limit()), new.max_files,
                                           new.max_connections)
        self.router.max_files = self.stats.limits["max_files"]
        self.router.reload(new)
        self.listener.reconfigure(new)
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
        listener, dispatcher = self.listener, self.dispatcher
        assert listener is not None and dispatcher is not None
        guard = listener.guard
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
            peer = Peer.from_metadata(str(last.get("Peer-Address") or ""), listener.user_id(last))
            fd = listener.source_fd(last)
            if guard is not None:
                guard.pending.pop(fd, None)  # it spoke: no longer the first to go
            # The payload is read in place (a memoryview of libzmq's buffer): no copy of a
            # frame that may be megabytes and is often refused.
            for reply, reply_fd in dispatcher.handle([p.bytes for p in parts[:-1]] + [last.buffer], peer, fd):
                self._send(reply, reply_fd)

    def _sweep(self) -> None:
        """Close idle files; forget expired busy entries; listen again when descriptors came back
        and return a flood's memory."""
        assert self.router is not None
        self.router.close_idle(self.config.idle_file_seconds)
        self.stats.fold_gone()
        if self.listener is not None and self.listener.guard is not None:
            self.listener.guard.sweep()
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
        if self.listener is not None:
            self.listener.close()
        self.router_socket = None
        if self.acks is not None and not self._writers_running:
            self.acks.close()
            self.acks = None
        if self.context is not None:
            self.context.term()  # writers hold no zmq socket: nothing can make this wait
        self.context = None
        if self.listener is not None:
            self.listener.unlock()
            self.listener = None


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
