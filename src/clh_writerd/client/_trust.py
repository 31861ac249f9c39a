"""Whether the client may talk to what listens at its endpoint.

An ipc endpoint is trusted only if its directory passes the daemon's own
rule (``_sockdir``): owned by this user, root or the configured daemon user,
writable by nobody else (by the group only if it is the configured socket
group). Otherwise whoever created ``/tmp/clh-writerd-<uid>`` before the
daemon, or can write in the directory, could listen there and receive every
record. The check runs before each connection attempt; a failing endpoint
is never connected to: the handler writes through its fallback and warns
once with the reason. tcp endpoints are authenticated with CURVE instead
(``curve_keys``).
"""

import os
import warnings
from typing import Optional, Tuple

import zmq.auth

from .._sockdir import group_id, ipc_directory, socket_dir_problem, user_id


class EndpointTrust:
    """``problem()``: why the endpoint must not be used now ("" when it may)."""

    def __init__(self, endpoint: str, daemon_user: Optional[str] = None, socket_group: Optional[str] = None) -> None:
        self.endpoint = endpoint
        self.directory = ipc_directory(endpoint)
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
        warnings.warn(f"clh-writerd: not connecting to {self.endpoint}: {reason}; records are written "
                      "through the fallback (see docs/security.md, socket directory)", RuntimeWarning, stacklevel=2)


def read_key(path: str, secret: bool) -> Tuple[bytes, bytes]:
    """(public, secret) of a zmq.auth certificate file (``clh-writerd keygen``)."""
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
