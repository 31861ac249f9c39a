"""The message pipeline, sans I/O: frames in, replies out.

``Dispatcher.handle(frames, peer, fd)`` takes one message as the ROUTER
socket gave it and returns the replies to send now; the writers answer the
rest later through the ack queue. For a batch or a sync record:

decode -> admit (the peer's rights) -> route (the file's writer) -> busy
check -> render -> submit (or, for a sync record, write it here when that
costs no wait: ``FileWriter.write_now``).

Rendering comes after every check that can refuse the batch, so a daemon
under back-pressure does not render the batches it refuses. The busy map
(per-process order under back-pressure) lives here. Nothing here touches a
socket: the server sends what ``handle`` returns, and unit tests drive it
with frames and a real router (tests/unit/daemon/test_dispatch.py).
"""

import logging
import os
import time
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

from .. import protocol
from .._version import __version__
from .access import LOCAL, AccessPolicy, Peer
from .config import Config
from .policy import OptionPolicy
from .stats import PEER_LOGGER, DaemonStats, printable
from .writers import FileWriter, Router, Work, queued_cost

peer_log = logging.getLogger(PEER_LOGGER)

# How long a busy refusal holds back a client's later batches for that file.
BLOCK_SECONDS = 2.0

# A reply: the frames to send, and the connection's descriptor (-1: unknown).
Reply = Tuple[List[bytes], int]


class Dispatcher:
    """decode -> admit -> route -> busy check -> render -> submit (module doc)."""

    def __init__(self, config: Config, stats: DaemonStats, access: AccessPolicy, router: Router,
                 stopping: Callable[[], bool], stats_document: Callable[[Hashable], bytes],
                 may_send_large: Callable[[int, bytes], bool]) -> None:
        """``stopping()``: the daemon is draining (new work is refused);
        ``stats_document(scope)``: the packed stats document for a scope
        (None: everything); ``may_send_large(fd, identity)``: whether that
        connection may be sent a large reply now (it read the last one)."""
        self.config = config
        self.stats = stats
        self.access = access
        self.router = router
        self.stopping = stopping
        self.stats_document = stats_document
        self.may_send_large = may_send_large
        # (session, path) -> (the refused batch's seq, until when later ones are refused)
        self.blocked: Dict[Tuple[Any, str], Tuple[int, float]] = {}

    def handle(self, frames: List[Any], peer: Peer = LOCAL, fd: int = -1) -> List[Reply]:
        """The replies to send now for one message.

        Isolated: whatever one message raises becomes an ``internal`` error
        reply and a counter; the daemon goes on with the next message.
        """
        replies: List[Reply] = []
        try:
            self._handle(frames, peer, fd, replies)
        except Exception as exc:
            self.stats.count(protocol.E_INTERNAL)
            peer_log.error("internal error on a message (answered, daemon goes on): %s",
                           printable(f"{type(exc).__name__}: {exc}"[:500]))
            if 2 <= len(frames) <= 3:
                seq = rid = None
                try:  # echo the batch seq / request id when the frame names one
                    request = protocol.decode_request(frames[-1])
                    seq, rid = getattr(request, "seq", None), getattr(request, "id", None)
                except Exception:
                    pass
                reply = protocol.encode_error(protocol.E_INTERNAL, f"{type(exc).__name__}", seq=seq, id=rid)
                replies.append((frames[:-1] + [reply], -1))
        return replies

    def sweep(self, now: float) -> None:
        """Forget busy refusals that expired (the server's idle sweep)."""
        for key in [k for k, (_, expires) in self.blocked.items() if expires < now]:
            del self.blocked[key]

    # -- stages ------------------------------------------------------------------
    def _handle(self, frames: List[Any], peer: Peer, fd: int, replies: List[Reply]) -> None:
        self.stats.count("frames_received")
        # DEALER: [identity, payload]; REQ: [identity, b"", payload].
        if len(frames) < 2 or len(frames) > 3:
            self.stats.count("malformed")
            if len(frames) > 3:  # a DEALER's identity is the first frame: tell it
                replies.append(([frames[0], protocol.encode_error(
                    protocol.E_MALFORMED, f"a message has one payload frame, this one has {len(frames) - 1}")], -1))
            return
        envelope, payload = frames[:-1], frames[-1]
        request: Optional[protocol.Request] = None
        try:
            if len(payload) > self.config.max_message_bytes:
                # Bounded (see listener.hard_frame_limit): decode only to name the batch refused.
                try:
                    request = protocol.decode_request(payload)
                except protocol.ProtocolError:
                    pass
                raise protocol.ProtocolError(
                    protocol.E_TOO_LARGE, f"frame of {len(payload)} bytes exceeds max_message_bytes "
                    f"({self.config.max_message_bytes})")
            request = protocol.decode_request(payload)
            reply = self._dispatch(envelope, request, len(payload), peer, fd, replies)
        except protocol.ProtocolError as exc:
            self.stats.count(exc.code)
            if exc.code == protocol.E_UNAUTHORIZED:
                self.stats.refused_peer(peer.uid)
            # Echo the batch seq / request id so the client knows what failed.
            seq = getattr(request, "seq", None)
            rid = getattr(request, "id", None)
            reply = protocol.encode_error(exc.code, exc.message, seq=seq, id=rid)
            if exc.code != protocol.E_BUSY:
                peer_log.warning("refused a message: %s", printable(str(exc)))
        if reply is not None:
            replies.append((envelope + [reply], fd))

    def _dispatch(self, envelope: List[bytes], request: protocol.Request, size: int, peer: Peer, fd: int,
                  replies: List[Reply]) -> Optional[bytes]:
        # Every message needs the same rights: stats reveal paths and clients.
        decision = self.access.decide(peer)
        if isinstance(request, protocol.Batch):
            self._route(envelope, request, protocol.encode_ack(request.seq), request.seq, None, size, peer,
                        decision.dirs, decision.authority, fd, replies)
            return None
        if isinstance(request, protocol.SyncRecord):
            self._route(envelope, request, protocol.encode_ok(request.id), None, request.id, size, peer,
                        decision.dirs, decision.authority, fd, replies)
            return None
        if isinstance(request, protocol.StatsRequest):
            if fd >= 0 and not self.may_send_large(fd, envelope[0]):
                self.stats.count("replies_dropped")  # it has not read the last one: no new document for it
                return None
            return protocol.encode_ok(request.id, packed_data=self.stats_document(
                None if decision.admin else peer.principal))
        if isinstance(request, protocol.Ping):
            return protocol.encode_ok(request.id, {"version": __version__, "pid": os.getpid(),
                                                   "max_message_bytes": self.config.max_message_bytes,
                                                   "protocol": protocol.PROTOCOL_VERSION})
        if isinstance(request, protocol.Report):
            self.stats.report(request.client, request.counters, peer, request.state, request.file, request.error,
                              request.final)
            return protocol.encode_ok(request.id)
        raise protocol.ProtocolError(protocol.E_INTERNAL, "unhandled message")  # pragma: no cover

    def _render_error(self) -> None:
        """A record whose values its format cannot render: written as a line
        saying so (with the values), counted here."""
        self.stats.count("render_errors")

    def _route(self, envelope: List[bytes], request: Any, ok_reply: bytes, seq: Optional[int], rid: Optional[int],
               size: int, peer: Peer, dirs: Optional[Tuple[str, ...]], authority: Any, fd: int,
               replies: List[Reply]) -> None:
        """A batch (``seq``) or a sync record (``rid``): admitted, routed,
        checked for room, then rendered and handed to the file's writer."""
        client, path, options = request.client, request.path, request.options
        client_stats = self.stats.client(client, peer)
        if self.stopping():
            raise protocol.ProtocolError(protocol.E_SHUTTING_DOWN, "the daemon is stopping")
        sync = rid is not None
        try:
            if dirs is not None:  # peer_dirs: checked before the file is opened or created
                lock_dir = options.get("lock_file_directory") if isinstance(options, dict) else None
                self.access.check_path(dirs, self.router.policy, path, lock_dir if isinstance(lock_dir, str) else None)
            principal = peer.principal
            writer = self.router.route(path, options, principal, authority, peer.pid)
        except protocol.ProtocolError:
            client_stats.errors += 1
            raise
        session = (peer.identity, client.session)  # another peer cannot block this one
        writer.stats.seen_from(principal)
        blocked = self._refused_batches(session, writer.path, seq)
        if blocked or not writer.has_room(sync):
            self._busy(writer, session, seq, blocked)
        lines = request.lines(self._render_error)  # only now: a refused batch is never rendered
        if not OptionPolicy.encodable(writer.options, lines):
            client_stats.errors += 1
            raise protocol.ProtocolError(
                protocol.E_BAD_OPTIONS, f"a record cannot be encoded in {writer.options.get('encoding')} "
                "and unicode_error_policy = strict would drop it")
        work = Work(envelope, lines, ok_reply, seq, rid, queued_cost(lines), principal, authority)
        written = writer.write_now(work) if sync else None
        if written is not None:  # written (or refused) here, without the writer thread: reply at once
            replies += [(reply, fd) for reply in written]
        elif not writer.submit(work, sync=sync):
            self._busy(writer, session, seq, False)
        writer.stats.records_received += len(lines)
        writer.stats.bytes_received += size
        client_stats.records += len(lines)
        if sync:
            client_stats.sync_records += 1
        else:
            client_stats.batches += 1

    def _busy(self, writer: FileWriter, session: Any, seq: Optional[int], blocked: bool) -> None:
        """Refuse as busy; remember a refused batch (per-process order)."""
        writer.stats.busy_refusals += 1
        if seq is not None and not blocked:
            self._block(session, writer.path, seq)
        budget = not blocked and "bytes" in writer.refusal
        if budget:
            self.stats.count("queue_bytes_refused")
        raise protocol.ProtocolError(protocol.E_BUSY, f"queue for {writer.path} is full"
                                     + (f": {writer.refusal}" if budget else ""))

    def _refused_batches(self, session: Any, path: str, seq: Optional[int]) -> bool:
        """Per-process order under backpressure: once a client's batch for a
        file was refused as busy, its later batches for that file are refused
        too until it sends the refused one again (or BLOCK_SECONDS pass, in
        case it wrote that batch through its fallback instead)."""
        if seq is None or not self.blocked:
            return False
        key = (session, path)
        entry = self.blocked.get(key)
        if entry is None:
            return False
        first, expires = entry
        if seq == first or time.monotonic() > expires:
            del self.blocked[key]
            return False
        return True

    def _block(self, session: Any, path: str, seq: int) -> None:
        """Remember a busy refusal (see _refused_batches); the map is bounded by max_clients."""
        blocked = self.blocked
        if len(blocked) >= self.config.max_clients:
            self.sweep(time.monotonic())
            while len(blocked) >= self.config.max_clients:
                del blocked[next(iter(blocked))]
                self.stats.count("busy_map_evictions")
        blocked[(session, path)] = (seq, time.monotonic() + BLOCK_SECONDS)
