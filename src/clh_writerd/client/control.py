"""One request, one reply: stats, ping and reports over a short-lived REQ socket."""

from typing import Optional

import zmq

from .. import protocol


class DaemonUnavailable(RuntimeError):
    """No daemon answered at the endpoint in time."""


def request(endpoint: Optional[str], payload: bytes, timeout: float = 2.0) -> protocol.Reply:
    """Send one encoded request and return the decoded reply.

    Raises DaemonUnavailable when nothing answers within ``timeout`` seconds.
    The socket never lingers, so a missing daemon cannot hang the caller.
    """
    endpoint = endpoint or protocol.default_endpoint()
    context: zmq.Context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(int(timeout * 1000)):
            raise DaemonUnavailable(f"no clh-writerd answered at {endpoint} within {timeout:g}s")
        return protocol.decode_reply(sock.recv())
    finally:
        sock.close(linger=0)
