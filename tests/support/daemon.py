"""A real clh-writerd subprocess, a raw protocol client, and the small
things they need (config files, socket dirs, ports, a held CLH lock)."""

import contextlib
import os
import shutil
import signal as _signal
import socket
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import portalocker
import zmq
from concurrent_log_handler import ConcurrentRotatingFileHandler

from clh_writerd import protocol
from clh_writerd.client.control import DaemonUnavailable, request

from .processes import DEFAULT_TIMEOUT, wait_for

# The daemon needs Python 3.8+; the thread client is tested down to 3.6 against
# a daemon on a newer interpreter (scripts/test_matrix.py sets this).
DAEMON_PYTHON = os.environ.get("CLH_WRITERD_DAEMON_PYTHON") or sys.executable


def short_socket_dir() -> str:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="cw-", dir="/tmp")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config(path: str, sections: Dict[str, Dict[str, Any]], files: Iterable[Dict[str, Any]] = ()) -> str:
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    for entry in files:
        lines.append("[[files]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


class DaemonProcess:
    """``python -m clh_writerd --config FILE`` as a subprocess."""

    def __init__(self, workdir: str, log_dir: Optional[str] = None, endpoint: Optional[str] = None,
                 daemon: Optional[Dict[str, Any]] = None, limits: Optional[Dict[str, Any]] = None,
                 fsync: Optional[Dict[str, Any]] = None, files: Iterable[Dict[str, Any]] = (),
                 preexec_fn: Optional[Callable[[], None]] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.workdir = workdir
        self.log_dir = log_dir or os.path.join(workdir, "logs")
        self.socket_dir = short_socket_dir()
        self.endpoint = endpoint or f"ipc://{self.socket_dir}/w.sock"
        daemon_section = {"endpoint": self.endpoint, "allowed_dirs": [self.log_dir], "drain_timeout": 10.0}
        daemon_section.update(daemon or {})
        # Clients ask a tcp endpoint without CURVE only when told (the client's tcp_auth).
        self.tcp_auth = daemon_section.get("tcp_auth")
        sections = {"daemon": daemon_section}
        if limits:
            sections["limits"] = limits
        if fsync:
            sections["fsync"] = fsync
        self.config_path = write_config(os.path.join(workdir, "clh-writerd.toml"), sections, files)
        self.stderr_path = os.path.join(workdir, "daemon.stderr")
        self.proc: Optional[subprocess.Popen] = None
        self._preexec_fn = preexec_fn
        self.env = env

    def start(self, wait: bool = True, env: Optional[Dict[str, str]] = None) -> "DaemonProcess":
        """Run the daemon; ``env`` (or the constructor's) is added to os.environ for it."""
        extra = env if env is not None else self.env
        stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [DAEMON_PYTHON, "-m", "clh_writerd", "--config", self.config_path],
            cwd=self.workdir, stdout=stderr, stderr=stderr, preexec_fn=self._preexec_fn,
            env={**os.environ, **extra} if extra else None,
        )
        stderr.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                return isinstance(request(self.endpoint, protocol.encode_ping(), 0.5, self.tcp_auth), protocol.Ok)
            except DaemonUnavailable:
                return False

        wait_for(answers, timeout, "the daemon to answer a ping")

    def stats(self, timeout: float = 5.0) -> Dict[str, Any]:
        reply = request(self.endpoint, protocol.encode_stats_request(), timeout, self.tcp_auth)
        assert isinstance(reply, protocol.Ok), reply
        return reply.data

    def file_stats(self, path: str) -> Dict[str, Any]:
        real = os.path.realpath(path)
        for entry in self.stats()["files"]:
            if entry["path"] == real:
                return entry
        raise KeyError(path)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = _signal.SIGTERM, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEFAULT_TIMEOUT)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class RawClient:
    """A minimal protocol client: a DEALER for batches, a REQ for sync records."""

    def __init__(self, endpoint: str, program: str = "raw-test-client",
                 curve: Optional[Tuple[bytes, bytes, bytes]] = None) -> None:
        """``curve``: (daemon public key, client public key, client secret key) for a CURVE tcp endpoint."""
        self.endpoint = endpoint
        self.curve = curve
        self.context = zmq.Context()
        self.dealer = self._socket(zmq.DEALER)
        self.dealer.connect(endpoint)
        self.client = protocol.new_client_id(program)
        self.seq = 0

    def send_batch(self, path: str, records: List[str], options: Optional[Dict[str, Any]] = None) -> int:
        self.seq += 1
        self.dealer.send(protocol.encode_batch(self.client, self.seq, path, options or {}, records))
        return self.seq

    def send_raw(self, payload: bytes) -> None:
        self.dealer.send(payload)

    def recv(self, timeout: float = DEFAULT_TIMEOUT) -> protocol.Reply:
        if not self.dealer.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout}s")
        return protocol.decode_reply(self.dealer.recv())

    def write(self, path: str, records: List[str], options: Optional[Dict[str, Any]] = None,
              timeout: float = DEFAULT_TIMEOUT) -> protocol.Reply:
        """Send one batch and return its reply (ack or error)."""
        seq = self.send_batch(path, records, options)
        reply = self.recv(timeout)
        assert getattr(reply, "seq", seq) == seq, (reply, seq)
        return reply

    def sync(self, path: str, record: str, options: Optional[Dict[str, Any]] = None,
             timeout: float = DEFAULT_TIMEOUT) -> protocol.Reply:
        req = self._socket(zmq.REQ)
        req.connect(self.endpoint)
        try:
            self.seq += 1
            req.send(protocol.encode_sync(self.client, self.seq, path, options or {}, record))
            if not req.poll(int(timeout * 1000)):
                raise AssertionError(f"no reply to sync within {timeout}s")
            return protocol.decode_reply(req.recv())
        finally:
            req.close()

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        return sock

    def try_recv(self, timeout: float) -> Optional[protocol.Reply]:
        """The next reply, or None if none arrives within ``timeout`` seconds."""
        if not self.dealer.poll(int(timeout * 1000)):
            return None
        return protocol.decode_reply(self.dealer.recv())

    def close(self) -> None:
        self.dealer.close(0)
        self.context.term()


@contextlib.contextmanager
def hold_clh_lock(path: str) -> Iterator[None]:
    """Hold the CLH lock of ``path`` (as another writer of the file would), so
    the daemon's writer for it blocks until the block ends."""
    lock_dir, lock_name = ConcurrentRotatingFileHandler.baseLockFilename(os.path.abspath(path))
    with open(os.path.join(lock_dir, lock_name), "a") as f:
        portalocker.lock(f, portalocker.LOCK_EX)
        try:
            yield
        finally:
            portalocker.unlock(f)


def free_tcp_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
