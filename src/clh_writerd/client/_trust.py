"""Whether the client may talk to what listens at its endpoint.

An ipc endpoint is trusted only if its directory passes the daemon's own
rule (``_sockdir``): owned by this user, root or the configured daemon user,
writable by nobody else (by the group only if it is the configured socket
group). Otherwise whoever created ``/tmp/clh-writerd-<uid>`` before the
daemon, or can write in the directory, could listen there and receive every
record. The check runs before each connection attempt; a failing endpoint
is never connected to: the handler writes through its fallback and warns
once with the reason. tcp endpoints are authenticated with CURVE instead
(``CurveKeys``): one without the daemon's key is not used either (anyone
holding the port would get the records) unless ``tcp_auth = "none"``; nor
is an abstract ``ipc://@name`` (any local process can bind the name).
"""

import os
import warnings
from typing import Optional, Tuple

import zmq.auth

from ..protocol import printable
from .._sockdir import group_id, ipc_directory, key_file_problem, socket_dir_problem, user_id

# Transports whose listener nothing local vouches for: CURVE, or tcp_auth = "none".
NETWORK_SCHEMES = ("tcp://", "ws://", "wss://", "tipc://")


class EndpointTrust:
    """``problem()``: why the endpoint must not be used now ("" when it may)."""

    def __init__(self, endpoint: str, daemon_user: Optional[str] = None, socket_group: Optional[str] = None,
                 curve: bool = False, tcp_auth: Optional[str] = "curve") -> None:
        self.endpoint = endpoint
        self.directory = ipc_directory(endpoint)
        self.refused = ""  # a transport never used, whatever the filesystem says
        if endpoint.startswith("ipc://@"):
            self.directory = None
            self.refused = ("abstract ipc endpoints (ipc://@name) are refused: any local process can bind the "
                            "name first; use a socket path")
        elif endpoint.startswith(NETWORK_SCHEMES) and not curve and tcp_auth != "none":
            self.refused = ("no CURVE key for the daemon (curve_server_key, $CLH_WRITERD_CURVE_SERVER_KEY): "
                            "whoever holds the port would receive the records; give the daemon's key, or "
                            "tcp_auth='none' ($CLH_WRITERD_TCP_AUTH=none) to send them in the clear")
        self._warned = False  # a plain flag, no lock: survives fork(); a rare second warning is harmless
        self.trusted = {os.getuid(), 0}
        self.group: Optional[int] = None
        self.config_error = ""
        try:
            uid = user_id(daemon_user)
            if uid is not None:
                self.trusted.add(uid)
            self.group = group_id(socket_group)
        except KeyError as exc:
            self.config_error = f"unknown daemon_user or socket_group {exc}"

    def problem(self) -> str:
        if self.refused:
            self.warn_once(self.refused)
            return self.refused
        if self.directory is None:
            return ""
        if self.config_error:
            reason = self.config_error
        else:
            reason = socket_dir_problem(self.directory, self.trusted, self.group)
            if reason.endswith("does not exist"):
                return "no daemon: " + reason  # nothing to distrust yet; not worth a warning
        if reason:
            self.warn_once(reason)
        return reason

    def warn_once(self, reason: str) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(printable(f"clh-writerd: not connecting to {self.endpoint}: {reason}; records are written "
                                "through the fallback (see docs/security.md, who can listen)"),
                      RuntimeWarning, stacklevel=2)


def read_key(path: str, secret: bool) -> Tuple[bytes, bytes]:
    """(public, secret) of a zmq.auth certificate file (``clh-writerd keygen``); a secret key
    someone else can read or write is refused (ValueError), as ssh refuses such a key."""
    if secret:
        problem = key_file_problem(path, {os.getuid(), 0}, secret=True)
        if problem:
            raise ValueError(problem)

    public, secret_key = zmq.auth.load_certificate(path)
    if secret and not secret_key:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key or b""


class CurveKeys:
    """The client side of CURVE: the daemon's public key and this client's key pair."""

    def __init__(self, server_key: str, secret_key: str) -> None:
        self.server_public, _ = read_key(server_key, secret=False)
        self.public, self.secret = read_key(secret_key, secret=True)

    def apply(self, sock: object) -> None:
        sock.curve_serverkey = self.server_public  # type: ignore[attr-defined]
        sock.curve_publickey = self.public  # type: ignore[attr-defined]
        sock.curve_secretkey = self.secret  # type: ignore[attr-defined]
