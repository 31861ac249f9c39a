"""A small RELP client: open, syslog, rsp, close, with a window of unacked frames.

RELP (Reliable Event Logging Protocol, rsyslog's librelp) frames are
``TXNR SP COMMAND SP DATALEN [SP DATA] LF``. Every ``syslog`` frame the client
sends is answered by an ``rsp`` frame carrying the same transaction number and
a status ("200 OK"). The server may announce ``serverclose`` at any time.

This module does socket I/O only; which records to send and what an ack
means for the checkpoint is the forwarder's business. The window is enforced
by the caller (``in_flight``), and resend after reconnect is the caller's
too: a fresh ``RelpClient`` starts at transaction 1, and the forwarder
re-reads everything past its checkpoint.
"""

import select
import socket
import ssl
import time
from typing import Iterator, List, Optional, Set, Tuple

RELP_VERSION = b"0"
MAX_TXNR = 999_999_999
# A frame header is at most "999999999 serverclose 999999999 " (spec: TXNR and DATALEN <= 9 digits).
MAX_HEADER = 48
# What a server sends is an ``rsp`` ("200 OK", the open's offers) or ``serverclose``:
# a few hundred bytes. Anything larger is hostile or broken, and refusing it at
# the header is what keeps the client's memory bounded (issue 29).
MAX_DATA = 64 * 1024
RECV_BYTES = 65536


class RelpError(ConnectionError):
    """The RELP session is unusable: connection lost, refused or a protocol error."""


class RelpProtocolError(RelpError):
    """The server sent something no RELP server sends: malformed, oversized or unsolicited frames."""


def encode_frame(txnr: int, command: bytes, data: bytes = b"") -> bytes:
    """One RELP frame; an empty DATA has no SP before the trailer."""
    head = b"%d %s %d" % (txnr, command, len(data))
    return head + (b" " + data if data else b"") + b"\n"


class FrameParser:
    """Incremental RELP frame decoder: feed bytes, take whole frames.

    Bounded: the buffer never holds more than one header (``MAX_HEADER``) plus
    one frame's data (``max_data``); a longer header, a DATALEN above
    ``max_data`` or bytes that are not a frame raise RelpProtocolError as soon
    as they are seen, before anything is buffered for them.
    """

    def __init__(self, max_data: int = MAX_DATA) -> None:
        self._buf = bytearray()
        self.max_data = max_data

    def feed(self, data: bytes) -> List[Tuple[int, bytes, bytes]]:
        """Append ``data``; return every complete (txnr, command, data) frame."""
        self._buf += data
        frames: List[Tuple[int, bytes, bytes]] = []
        while True:
            frame = self._take()
            if frame is None:
                return frames
            frames.append(frame)

    def _take(self) -> Optional[Tuple[int, bytes, bytes]]:
        buf = self._buf
        sp1 = buf.find(b" ", 0, MAX_HEADER)
        sp2 = buf.find(b" ", sp1 + 1, MAX_HEADER) if sp1 > 0 else -1
        if sp2 < 0:
            if len(buf) >= MAX_HEADER or (sp1 < 0 and len(buf) > 9) or (sp1 >= 0 and not buf[:sp1].isdigit()):
                raise RelpProtocolError(f"malformed RELP header {bytes(buf[:MAX_HEADER])!r}")
            return None
        end_digits = sp2 + 1
        while end_digits < len(buf) and 0x30 <= buf[end_digits] <= 0x39:
            end_digits += 1
        if end_digits - sp2 - 1 > 9:
            raise RelpProtocolError("RELP DATALEN longer than 9 digits")
        if end_digits == len(buf):
            return None
        txnr_s, command, digits = bytes(buf[:sp1]), bytes(buf[sp1 + 1:sp2]), bytes(buf[sp2 + 1:end_digits])
        if not (txnr_s.isdigit() and len(txnr_s) <= 9 and digits and command.isalpha()):
            raise RelpProtocolError(f"malformed RELP header {bytes(buf[:end_digits + 1])!r}")
        datalen = int(digits)
        if datalen > self.max_data:
            raise RelpProtocolError(f"RELP frame of {datalen} bytes announced (at most {self.max_data})")
        if datalen == 0:
            if buf[end_digits] != 0x0A:
                raise RelpProtocolError("RELP frame without trailer")
            del buf[:end_digits + 1]
            return int(txnr_s), command, b""
        if buf[end_digits] != 0x20:
            raise RelpProtocolError("RELP frame without SP before DATA")
        end = end_digits + 1 + datalen
        if len(buf) <= end:
            return None
        if buf[end] != 0x0A:
            raise RelpProtocolError("RELP frame without trailer")
        data = bytes(buf[end_digits + 1:end])
        del buf[:end + 1]
        return int(txnr_s), command, data


class RelpClient:
    """One RELP session to ``host:port`` (optionally TLS, as imrelp's tls="on")."""

    def __init__(self, host: str, port: int, timeout: float = 10.0,
                 tls: Optional[ssl.SSLContext] = None, software: str = "clh-writerd") -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._tls = tls
        self._software = software
        self._sock: Optional[socket.socket] = None
        self._parser = FrameParser()
        self._next = 1
        self._pending: Set[int] = set()  # syslog frames sent and not yet answered

    @property
    def in_flight(self) -> int:
        """syslog frames sent and not yet answered."""
        return len(self._pending)

    # -- session ---------------------------------------------------------------
    def open(self) -> None:
        """Connect and negotiate (``open`` -> ``rsp 200``); raises RelpError."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except (OSError, ssl.SSLError) as exc:
            raise RelpError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # TCP keepalive: a dead peer behind a link that went down is noticed.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock = sock
        offers = b"relp_version=%s\nrelp_software=%s\ncommands=syslog" % (RELP_VERSION, self._software.encode())
        txnr = self._send(b"open", offers)
        for got, command, data in self._wait_frames(self.timeout):
            if got == txnr and command == b"rsp":
                if not data.startswith(b"200"):
                    self.abort()
                    raise RelpError(f"RELP open refused: {data[:200]!r}")
                return
            self.abort()
            if command == b"serverclose":
                raise RelpError("RELP server closed the session")
            raise RelpProtocolError(f"RELP server answered open with {command[:32]!r} for txnr {got}")
        self.abort()
        raise RelpError("RELP open was not answered")

    def send_syslog(self, message: bytes) -> int:
        """Send one syslog message; return its transaction number (acked later by ``read_acks``)."""
        txnr = self._send(b"syslog", message)
        self._pending.add(txnr)
        return txnr

    def send_many(self, messages: List[bytes]) -> List[int]:
        """Send several syslog messages in one write; return their transaction numbers."""
        if self._sock is None:
            raise RelpError("not connected")
        txnrs, frames = [], []
        for message in messages:
            txnr = self._next
            self._next = 1 if txnr >= MAX_TXNR else txnr + 1
            txnrs.append(txnr)
            frames.append(encode_frame(txnr, b"syslog", message))
        self._write(b"".join(frames))
        self._pending.update(txnrs)
        return txnrs

    def read_acks(self, timeout: float) -> List[int]:
        """Transaction numbers acknowledged with 200 within ``timeout`` (may be empty).

        A negative rsp, a ``serverclose`` or a lost connection raises RelpError:
        everything not yet acknowledged must then be sent again on a new session.
        A frame no server sends (an rsp to nothing in flight, another command)
        raises RelpProtocolError: acks are only ever taken for frames in flight,
        so what the server sends cannot grow anything on this side.
        """
        acked = []
        for txnr, command, data in self._wait_frames(timeout, once=True):
            if command == b"rsp":
                if txnr not in self._pending:
                    raise RelpProtocolError(f"RELP rsp for txnr {txnr}, which is not in flight")
                if not data.startswith(b"200"):
                    raise RelpError(f"RELP server refused txnr {txnr}: {data[:200]!r}")
                self._pending.discard(txnr)
                acked.append(txnr)
            elif command == b"serverclose":
                raise RelpError("RELP server closed the session")
            else:
                raise RelpProtocolError(f"RELP server sent {command[:32]!r}")
        return acked

    def close(self, timeout: float = 2.0) -> List[int]:
        """Polite close (``close`` -> ``rsp``), bounded; always releases the socket.

        Returns the transaction numbers acknowledged while closing: the server
        answers in order, so every frame sent before ``close`` is answered first.
        """
        acked: List[int] = []
        if self._sock is None:
            return acked
        try:
            txnr = self._send(b"close")
            for got, command, data in self._wait_frames(timeout):
                if got == txnr or command == b"serverclose":
                    break
                if command == b"rsp" and data.startswith(b"200") and got in self._pending:
                    self._pending.discard(got)
                    acked.append(got)
        except RelpError:
            pass
        self.abort()
        return acked

    def abort(self) -> None:
        """Drop the connection without the close handshake."""
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- frames ----------------------------------------------------------------
    def _send(self, command: bytes, data: bytes = b"") -> int:
        if self._sock is None:
            raise RelpError("not connected")
        txnr = self._next
        self._next = 1 if txnr >= MAX_TXNR else txnr + 1
        self._write(encode_frame(txnr, command, data))
        return txnr

    def _write(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            self.abort()
            raise RelpError(f"send failed: {exc}") from None

    def _wait_frames(self, timeout: float, once: bool = False) -> Iterator[Tuple[int, bytes, bytes]]:
        """Yield frames as they arrive, for up to ``timeout`` seconds (``once``: one read's worth).

        poll(), not select(): the daemon may hold thousands of descriptors, and
        select() refuses any numbered 1024 or above.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = self._sock
            if sock is None:
                raise RelpError("not connected")
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
            left = deadline - time.monotonic()
            if not pending:
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                if not poller.poll(max(0.0, left) * 1000):
                    return
            try:
                sock.settimeout(self.timeout)
                chunk = sock.recv(RECV_BYTES)
            except (OSError, ssl.SSLError) as exc:
                self.abort()
                raise RelpError(f"receive failed: {exc}") from None
            if not chunk:
                self.abort()
                raise RelpError("connection closed by the server")
            try:
                frames = self._parser.feed(chunk)
            except RelpProtocolError:
                self.abort()
                raise
            yield from frames
            if once or time.monotonic() >= deadline:
                return
