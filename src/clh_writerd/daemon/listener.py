"""The daemon's listening side: the ROUTER socket and what guards it.

``Listener.open()`` prepares the socket directory (refusing one someone
else controls), takes the one-daemon-per-endpoint lock, sets the socket's
bounds (frame size, receive and reply high-water marks, handshake time),
sets up CURVE on tcp and binds. ``ConnectionGuard`` keeps connections from
taking the descriptors files and libzmq need, from limits derived from
RLIMIT_NOFILE (``derived_limits``). The server owns the lifecycle and the
main loop; it asks the listener for the socket and hands it SIGHUP's new
configuration (``reconfigure``).
"""

import ctypes
import fcntl
import grp
import logging
import os
import resource
import socket
import struct
import termios
import time
from collections import OrderedDict
from typing import IO, Any, Callable, Dict, Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from .. import protocol
from .._sockdir import key_file_problem, socket_dir_problem
from .config import Config
from .errors import StartupError
from .stats import PEER_LOGGER, DaemonStats

log = logging.getLogger("clh_writerd.daemon")
peer_log = logging.getLogger(PEER_LOGGER)

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


class Listener:
    """The ROUTER socket: opened, bound and secured here, closed here (module doc)."""

    def __init__(self, config: Config, stats: DaemonStats, context: zmq.Context,
                 open_files: Callable[[], int]) -> None:
        """``stats.limits`` holds the derived limits (``derived_limits``);
        ``open_files()``: how many files the daemon serves now."""
        self.config = config
        self.stats = stats
        self.context = context
        self.open_files = open_files
        self.sock: Optional[zmq.Socket] = None
        self.guard: Optional[ConnectionGuard] = None
        self.authenticator: Optional[ThreadAuthenticator] = None  # CURVE on tcp
        self._lock_file: Optional[IO[str]] = None

    def open(self) -> zmq.Socket:
        """The bound ROUTER socket, its guard watching; StartupError if it cannot be."""
        cfg = self.config
        sock = self.context.socket(zmq.ROUTER)
        self.sock = sock
        sock.setsockopt(zmq.MAXMSGSIZE, hard_frame_limit(cfg.max_message_bytes))
        sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
        # A reply that cannot be queued (the peer's REPLY_HWM is reached, or
        # the peer is gone) raises instead of vanishing, so the server counts it.
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
        self.guard = ConnectionGuard(sock, self.stats.limits, self.open_files, self.stats, self.pause, self.resume)
        self._secure(sock)
        self._bind(sock)
        self.guard.local_address = self._local_address(sock)
        return sock

    def reconfigure(self, new: Config) -> None:
        """SIGHUP's part here (``stats.limits`` already derived again): the
        admitted keys, the limits, the frame size and the handshake time."""
        self.config = new
        if self.authenticator is not None:
            problem = self._keys_problem(new)
            if problem:  # a key planted in a directory someone else can write is never admitted
                log.error("reload: keeping the admitted keys: %s", problem)
            else:
                self.authenticator.configure_curve(domain="*", location=new.curve_public_keys_dir)
        if self.guard is not None:
            self.guard.limits = self.stats.limits
        sock = self.sock
        assert sock is not None
        sock.setsockopt(zmq.MAXMSGSIZE, hard_frame_limit(new.max_message_bytes))
        # RCVHWM stays as set at start (receive_buffer_bytes is restart-only): libzmq applies a new HWM to
        # the pipes of live connections from this thread while its I/O thread uses them (it crashed the
        # daemon, SIGSEGV, in 4 of 10 reloads).
        self.stats.limits["rcvhwm"] = int(sock.getsockopt(zmq.RCVHWM))
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(new.handshake_timeout * 1000))

    def user_id(self, frame: zmq.Frame) -> Optional[str]:
        """The admitted CURVE key's name (tcp), None on ipc."""
        if self.authenticator is None:
            return None
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:
            return None

    @staticmethod
    def source_fd(frame: zmq.Frame) -> int:
        """The descriptor of the connection a frame came on; -1 if unknown."""
        try:
            return int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, AttributeError, TypeError, ValueError):
            return -1

    def pause(self) -> None:
        """Stop accepting connections (descriptors nearly exhausted)."""
        assert self.sock is not None
        peer_log.warning("descriptors nearly exhausted: not accepting connections until some close")
        try:
            self.sock.unbind(self.config.endpoint)
        except zmq.ZMQError as exc:
            log.error("cannot pause the listener: %s", exc)

    def resume(self) -> None:
        assert self.sock is not None
        try:
            self._listen(self.sock)
            peer_log.info("accepting connections again")
        except (StartupError, OSError, zmq.ZMQError) as exc:
            log.error("cannot listen again (will retry): %s", exc)
            assert self.guard is not None
            self.guard.paused = True

    def close(self) -> None:
        """Close the guard, the socket and the authenticator (before the
        context is terminated); the lock is kept until ``unlock()``."""
        if self.guard is not None:
            if self.sock is not None:
                self.sock.disable_monitor()
            self.guard.close()
            self.guard = None
        if self.sock is not None:
            self.sock.close(linger=1000)
        self.sock = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def unlock(self) -> None:
        """Remove the ipc socket file and let the next daemon take the endpoint."""
        path = self.config.ipc_path
        if self._lock_file is not None:
            if path is not None and os.path.exists(path):
                os.unlink(path)
            self._lock_file.close()
            self._lock_file = None

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
