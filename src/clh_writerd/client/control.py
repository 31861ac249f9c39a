"""One request, one reply: stats, ping and reports over a short-lived REQ socket."""

import os
from typing import Optional

import zmq

from .. import protocol
from ._trust import CurveKeys, EndpointTrust


class DaemonUnavailable(RuntimeError):
    """No daemon answered at the endpoint in time."""


def request(endpoint: Optional[str], payload: bytes, timeout: float = 2.0,
            tcp_auth: Optional[str] = None) -> protocol.Reply:
    """Send one encoded request and return the decoded reply.

    Raises DaemonUnavailable when nothing answers within ``timeout`` seconds.
    The socket never lingers, so a missing daemon cannot hang the caller.
    ``tcp_auth``: "none" to ask a tcp endpoint without CURVE (default:
    $CLH_WRITERD_TCP_AUTH, else "curve").
    """
    endpoint = endpoint or protocol.default_endpoint()
    server_key, secret_key = (os.environ.get("CLH_WRITERD_CURVE_SERVER_KEY"),
                              os.environ.get("CLH_WRITERD_CURVE_SECRET_KEY"))
    curve = endpoint.startswith("tcp://") and bool(server_key and secret_key)
    # The same checks as the handlers', configured from the environment:
    # never ask (or believe) whoever squats an ipc directory; CURVE on tcp.
    problem = EndpointTrust(endpoint, os.environ.get("CLH_WRITERD_DAEMON_USER"),
                            os.environ.get("CLH_WRITERD_SOCKET_GROUP"), curve=curve,
                            tcp_auth=tcp_auth or os.environ.get("CLH_WRITERD_TCP_AUTH") or "curve").problem()
    if problem:
        raise DaemonUnavailable(f"not asking {endpoint}: {problem}")
    context: zmq.Context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    # A stats document is at most a frame; a larger reply is not ours to buffer.
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
    try:
        if curve:
            try:
                keys = CurveKeys(server_key, secret_key)  # type: ignore[arg-type]
            except (OSError, ValueError) as exc:  # unreadable, or a secret key others can read
                raise DaemonUnavailable(f"not asking {endpoint}: cannot use the CURVE keys: {exc}") from None
            keys.apply(sock)
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(int(timeout * 1000)):
            raise DaemonUnavailable(f"no clh-writerd answered at {endpoint} within {timeout:g}s")
        return protocol.decode_reply(sock.recv())
    finally:
        sock.close(linger=0)
