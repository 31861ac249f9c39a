"""The daemon's lifecycle: startup(), main_loop(), shutdown().

The main loop owns the ROUTER socket. For each frame it runs the daemon's
stages: ``decode`` (protocol), ``route`` (Router -> FileWriter), and hands
the work to the file's writer thread, which ``write``s and sends the ``ack``
back through an inproc PULL socket; the loop forwards it to the client.
Signal handlers only set flags.
"""

import dataclasses
import fcntl
import grp
import logging
import os
import signal
import sys
import time
from typing import IO, Any, Dict, List, Optional, Tuple

import zmq

from .. import __version__, protocol
from .config import Config, load_config
from .notify import SystemdNotifier
from .stats import DaemonStats, FileStats
from .writers import FileWriter, Router, Work

log = logging.getLogger("clh_writerd.daemon")

EXIT_OK = 0
EXIT_DRAIN_TIMEOUT = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_FORCED = 130

POLL_MS = 200
# Frames handled per poll wake-up before acks get their turn.
MAX_BURST = 256
# How long a busy refusal holds back a client's later batches for that file.
BLOCK_SECONDS = 2.0


# Settings a reload cannot apply to a running daemon (the endpoint is handled
# on its own); everything else applies live.
RESTART_ONLY: Tuple[str, ...] = ("socket_dir_mode", "socket_group", "allow_remote_tcp", "metrics_listen")
# The forwarder reads its [forward] options once, at start.
RESTART_ONLY += tuple(f"forward_{key}" for key in ("target", "paths", "state_file", "hostname", "window",
                                                   "checkpoint_interval", "timeout", "hold_max_bytes", "hold_dir", "tls", "tls_ca_file",
                                                   "tls_cert_file", "tls_key_file"))


def hard_frame_limit(max_message_bytes: int) -> int:
    """ZMQ_MAXMSGSIZE: frames up to twice the configured limit reach Python,
    where they are refused with a reply and counted; larger ones make libzmq
    drop the connection before the bytes are buffered (not counted)."""
    return min(2 * max_message_bytes, 2 * protocol.MAX_FRAME_BYTES)


class StartupError(RuntimeError):
    """The daemon cannot start (endpoint in use, bind failed, ...)."""


class Server:
    """One clh-writerd instance bound to one endpoint."""

    def __init__(self, config: Config, config_path: Optional[str] = None) -> None:
        self.config = config
        self.config_path = config_path
        self.stats = DaemonStats(config.endpoint, config.max_clients)
        self.context: Optional[zmq.Context] = None
        self.router_socket: Optional[zmq.Socket] = None
        self.ack_socket: Optional[zmq.Socket] = None
        self.router: Optional[Router] = None
        self._lock_file: Optional[IO[str]] = None
        self._ack_endpoint = f"inproc://clh-writerd-acks-{id(self)}"
        self.should_exit = False
        self.force_exit = False
        self.reload_requested = False
        self._writers_running = False
        self._blocked: Dict[Tuple[str, str], Tuple[int, float]] = {}
        self._old_handlers: List[Any] = []
        self.notifier = SystemdNotifier()
        self.metrics: Optional[Any] = None
        self.forwarder: Optional[Any] = None  # forward.Forwarder when [forward] target is set

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
        self._prepare_allowed_dirs()
        self.context = zmq.Context()
        self.ack_socket = self.context.socket(zmq.PULL)
        self.ack_socket.bind(self._ack_endpoint)
        self.router = Router(cfg, self.stats, self._make_writer)
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, hard_frame_limit(cfg.max_message_bytes))
        sock.setsockopt(zmq.LINGER, 1000)
        # Let zmq drop state of peers that vanished without closing.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        self.router_socket = sock
        self._bind(sock)
        if cfg.metrics_listen:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(cfg.metrics_listen, self.snapshot)
            log.info("metrics on http://%s/metrics", cfg.metrics_listen)
        if cfg.forward_target:
            from ..forward import Forwarder, options_from_config

            try:
                self.forwarder = Forwarder(options_from_config(cfg))
            except (RuntimeError, OSError) as exc:  # e.g. an unreadable checkpoint
                raise StartupError(f"forward: {exc}") from None
            self.forwarder.start()
        self._install_signal_handlers()
        self.notifier.ready(f"serving {cfg.endpoint}")
        log.info(
            "clh-writerd %s serving %s (pid %d, config %s); allowed dirs: %s",
            __version__, cfg.endpoint, os.getpid(), cfg.source, ", ".join(cfg.allowed_dirs),
        )

    def main_loop(self) -> None:
        poller = zmq.Poller()
        assert self.router_socket is not None and self.ack_socket is not None
        poller.register(self.router_socket, zmq.POLLIN)
        poller.register(self.ack_socket, zmq.POLLIN)
        while not self.should_exit:
            self.notifier.watchdog()
            events = dict(poller.poll(POLL_MS))
            if self.ack_socket in events:
                self._forward_acks()
            if self.router_socket in events:
                self._receive_burst()
            if self.reload_requested:
                self.reload()

    def shutdown(self) -> int:
        """Write and acknowledge everything received, within drain_timeout."""
        started = time.monotonic()
        deadline = started + self.config.drain_timeout
        code = EXIT_OK
        queued = sum(w.stats.queue_depth for w in self.router.writers.values()) if self.router else 0
        log.info("stopping: draining %d queued message(s) (timeout %.1fs)", queued, self.config.drain_timeout)
        self.notifier.stopping(f"draining {queued} queued message(s)")
        if self.router is not None:
            self.router.stop_all()
            while not self.force_exit:
                self.notifier.watchdog()
                running = [w for w in self.router.writers.values() if not w.join(0)]
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
        self._prepare_allowed_dirs()
        assert self.router is not None and self.router_socket is not None
        self.router.reload(new)
        self.router_socket.setsockopt(zmq.MAXMSGSIZE, hard_frame_limit(new.max_message_bytes))
        for writer in self.router.writers.values():
            writer.fsync_policy, writer.fsync_interval = new.fsync_for(writer.path)
            writer.capacity = writer.stats.capacity = new.queue_batches
        self.stats.max_clients = new.max_clients
        self.stats.count("reloads")
        log.info("reloaded %s; allowed dirs: %s", new.source, ", ".join(new.allowed_dirs))

    # -- stages ------------------------------------------------------------
    def _receive_burst(self) -> None:
        sock = self.router_socket
        assert sock is not None
        for _ in range(MAX_BURST):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(frames)

    def handle(self, frames: List[bytes]) -> None:
        """decode -> route -> hand to the writer (which acks), or reply now."""
        self.stats.count("frames_received")
        # DEALER: [identity, payload]; REQ: [identity, b"", payload].
        if len(frames) < 2 or len(frames) > 3:
            self.stats.count("malformed")
            return
        envelope, payload = frames[:-1], frames[-1]
        request: Optional[protocol.Request] = None
        try:
            if len(payload) > self.config.max_message_bytes:
                # Bounded (see hard_frame_limit): decode only to name the batch refused.
                try:
                    request = protocol.decode_request(payload)
                except protocol.ProtocolError:
                    pass
                raise protocol.ProtocolError(
                    protocol.E_TOO_LARGE, f"frame of {len(payload)} bytes exceeds max_message_bytes "
                    f"({self.config.max_message_bytes})")
            request = protocol.decode_request(payload)
            reply = self._dispatch(envelope, request, len(payload))
        except protocol.ProtocolError as exc:
            self.stats.count(exc.code)
            # Echo the batch seq / request id so the client knows what failed.
            seq = getattr(request, "seq", None)
            rid = getattr(request, "id", None)
            reply = protocol.encode_error(exc.code, exc.message, seq=seq, id=rid)
            if exc.code != protocol.E_BUSY:
                log.warning("refused a message: %s", exc)
        if reply is not None:
            self._send(envelope + [reply])

    def _dispatch(self, envelope: List[bytes], request: protocol.Request, size: int) -> Optional[bytes]:
        if isinstance(request, protocol.Batch):
            return self._route(envelope, request.client, request.path, request.options, request.records,
                               protocol.encode_ack(request.seq), request.seq, None, size)
        if isinstance(request, protocol.SyncRecord):
            return self._route(envelope, request.client, request.path, request.options, [request.record],
                               protocol.encode_ok(request.id), None, request.id, size)
        if isinstance(request, protocol.StatsRequest):
            return protocol.encode_ok(request.id, self.snapshot())
        if isinstance(request, protocol.Ping):
            return protocol.encode_ok(request.id, {"version": __version__, "pid": os.getpid(),
                                                   "max_message_bytes": self.config.max_message_bytes})
        if isinstance(request, protocol.Report):
            self.stats.client(request.client).reported.update(request.counters)
            return protocol.encode_ok(request.id)
        raise protocol.ProtocolError(protocol.E_INTERNAL, "unhandled message")  # pragma: no cover

    def _route(self, envelope: List[bytes], client: protocol.ClientId, path: str, options: dict,
               lines: List[str], ok_reply: bytes, seq: Optional[int], rid: Optional[int], size: int) -> Optional[bytes]:
        client_stats = self.stats.client(client)
        if self.should_exit:
            raise protocol.ProtocolError(protocol.E_SHUTTING_DOWN, "the daemon is stopping")
        assert self.router is not None
        try:
            writer = self.router.route(path, options)
        except protocol.ProtocolError:
            client_stats.errors += 1
            raise
        sync = rid is not None
        blocked = self._refused_batches(client, writer.path, seq)
        if blocked or not writer.submit(Work(envelope, lines, ok_reply, seq, rid), sync=sync):
            writer.stats.busy_refusals += 1
            if seq is not None and not blocked:
                self._blocked[(client.session, writer.path)] = (seq, time.monotonic() + BLOCK_SECONDS)
            raise protocol.ProtocolError(protocol.E_BUSY, f"queue for {writer.path} is full")
        writer.stats.records_received += len(lines)
        writer.stats.bytes_received += size
        client_stats.records += len(lines)
        if sync:
            client_stats.sync_records += 1
        else:
            client_stats.batches += 1
        return None

    def _refused_batches(self, client: protocol.ClientId, path: str, seq: Optional[int]) -> bool:
        """Per-process order under backpressure: once a client's batch for a
        file was refused as busy, its later batches for that file are refused
        too until it sends the refused one again (or BLOCK_SECONDS pass, in
        case it wrote that batch through its fallback instead)."""
        if seq is None or not self._blocked:
            return False
        key = (client.session, path)
        entry = self._blocked.get(key)
        if entry is None:
            return False
        first, expires = entry
        if seq == first or time.monotonic() > expires:
            del self._blocked[key]
            return False
        return True

    def _forward_acks(self, wait_ms: int = 0) -> None:
        sock = self.ack_socket
        assert sock is not None
        if wait_ms and not sock.poll(wait_ms):
            return
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send(frames)

    def _send(self, frames: List[bytes]) -> None:
        assert self.router_socket is not None
        try:
            self.router_socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            # The peer is gone or its pipe is full; it will resend what it
            # has not seen acknowledged.
            pass

    def snapshot(self) -> dict:
        doc = self.stats.snapshot()
        if self.forwarder is not None:
            doc["forward"] = self.forwarder.snapshot()
        return doc

    # -- resources -----------------------------------------------------------
    def _make_writer(self, path: str, options: dict) -> FileWriter:
        cfg = self.config
        stats = FileStats(path, options, cfg.queue_batches)
        policy, interval = cfg.fsync_for(path)
        assert self.context is not None
        writer = FileWriter(path, options, stats, self.context, self._ack_endpoint, cfg.queue_batches,
                            cfg.max_write_chars, policy, interval)
        writer.start()
        self.stats.files[path] = stats
        return writer

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
        endpoint = self.config.endpoint
        path = self.config.ipc_path
        if path is not None:
            self._prepare_socket_dir(os.path.dirname(path))
            self._take_lock(path + ".lock")
            if os.path.exists(path):  # left by a daemon that was killed
                os.unlink(path)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise StartupError(f"cannot bind {endpoint}: {exc}") from None
        if path is not None:
            # Connecting needs write permission on the socket file, which the
            # umask may have removed: the directory's mode decides who gets in.
            os.chmod(path, self.config.socket_dir_mode & 0o666)
            if self.config.socket_group:
                os.chown(path, -1, self._socket_gid())

    def _prepare_socket_dir(self, directory: str) -> None:
        cfg = self.config
        try:
            os.makedirs(directory, mode=cfg.socket_dir_mode, exist_ok=True)
            st = os.stat(directory)
            if st.st_uid == os.getuid():
                os.chmod(directory, cfg.socket_dir_mode)
                if cfg.socket_group:
                    os.chown(directory, -1, self._socket_gid())
        except OSError as exc:
            raise StartupError(f"cannot prepare socket directory {directory}: {exc}") from None

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
        for sock in (self.router_socket, self.ack_socket):
            if sock is not None:
                sock.close(linger=1000)
        self.router_socket = self.ack_socket = None
        if self.context is not None and not self._writers_running:
            # term() waits for every socket; a writer still stuck on the disk
            # holds one, so after a timed-out drain the process just exits.
            self.context.term()
        self.context = None
        path = self.config.ipc_path
        if self._lock_file is not None:
            if path is not None and os.path.exists(path):
                os.unlink(path)
            self._lock_file.close()
            self._lock_file = None


def configure_logging(level: str) -> None:
    """The daemon's own diagnostics: stderr, one line per event, with levels."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s clh-writerd[%(process)d]: %(message)s"))
    root = logging.getLogger("clh_writerd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
