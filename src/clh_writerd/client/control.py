"""One request, one reply: stats, ping and reports over a short-lived REQ socket."""

import os
from typing import Optional

import zmq

from .. import protocol
from ._trust import CurveKeys, EndpointTrust


class DaemonUnavailable(RuntimeError):
    """No daemon answered at the endpoint in time."""


def request(endpoint: Optional[str], payload: bytes, timeout: float = 2.0) -> protocol.Reply:
    """Send one encoded request and return the decoded reply.

    Raises DaemonUnavailable when nothing answers within ``timeout`` seconds.
    The socket never lingers, so a missing daemon cannot hang the caller.
    """
    endpoint = endpoint or protocol.default_endpoint()
    # The same checks as the handlers', configured from the environment:
    # never ask (or believe) whoever squats an ipc directory; CURVE on tcp.
    problem = EndpointTrust(endpoint, os.environ.get("CLH_WRITERD_DAEMON_USER"),
                            os.environ.get("CLH_WRITERD_SOCKET_GROUP")).problem()
    if problem:
        raise DaemonUnavailable(f"not asking {endpoint}: {problem}")
    context: zmq.Context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        server_key, secret_key = (os.environ.get("CLH_WRITERD_CURVE_SERVER_KEY"),
                                  os.environ.get("CLH_WRITERD_CURVE_SECRET_KEY"))
        if endpoint.startswith("tcp://") and server_key and secret_key:
            CurveKeys(server_key, secret_key).apply(sock)
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(int(timeout * 1000)):
            raise DaemonUnavailable(f"no clh-writerd answered at {endpoint} within {timeout:g}s")
        return protocol.decode_reply(sock.recv())
    finally:
        sock.close(linger=0)
