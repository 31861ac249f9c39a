"""What both handlers are as logging handlers: a wrapper around a CLH
handler (which describes the file and renders every line), its options, its
per-process state (stats, fallback, sockets, sender core) and the policies
that do not depend on how the sender waits."""

import logging
import os
import warnings
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

import msgpack
import zmq
from concurrent_log_handler import ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler

from .. import protocol
from .._batchwrite import CLHHandler, describe_handler, rotating_part
from .._compat import unsupported_platform
from . import _notices, _process
from ._delivery import Delivery
from ._direct import Confirmed, Fallback
from ._options import HandlerOptions
from ._core import SenderCore
from ._notices import DROP_WARNING_EVERY
from ._items import ItemMaker
from ._plans import Item, record_of
from ._stats import STATE_EMBEDDED, ClientStats
from ._transport import BatchLane, ZmqTransport
from ._trust import CurveKeys, EndpointTrust

# close(): seconds to wait for a write in progress before closing the file.
CLOSE_WAIT = 2.0


# The logger a handler says things about itself on (never handled by one of ours).
_OWN_LOGGER = _notices.LOGGER_NAME


def file_spec(handler: CLHHandler) -> Tuple[str, Dict[str, Any], str]:
    """(path, options, why the daemon would refuse them or ""). Bounds the
    daemon imposes are its policy, not the handler's: a file it would refuse
    is written by the fallback instead, with a warning."""
    try:
        path, options = describe_handler(handler)
    except ValueError as exc:  # a CLH feature the daemon cannot reproduce (atTime)
        return os.path.abspath(rotating_part(handler).baseFilename), {}, str(exc)
    try:
        options = protocol.check_file_options(options)
    except protocol.ProtocolError as exc:
        return path, options, str(exc)
    try:
        msgpack.packb([path, options])
    except UnicodeEncodeError:  # a name os.fsdecode() made of undecodable bytes
        return path, options, "its path or an option is not UTF-8, and the protocol carries only UTF-8 text"
    return path, options, ""


class WrappingHandler(logging.Handler):
    """The base of both handlers; subclasses say how the sender waits."""

    KIND = ""  # _options.THREAD or _options.ASYNC
    clh_writerd_handler = True  # how _notices tells our handlers from others
    # Class defaults: a handler whose constructor raised must still close
    # quietly when logging.shutdown() reaches it at exit.
    _closed = True
    _core: Optional[SenderCore] = None
    _pid = 0

    def __init__(self, handler: CLHHandler, **options: Any) -> None:
        # Everything that can refuse the arguments runs before
        # logging.Handler.__init__ registers us for logging.shutdown().
        unsupported = unsupported_platform("handler")
        if unsupported:
            raise RuntimeError(unsupported)
        self.opts = HandlerOptions.build(self.KIND, **options)
        path, file_options, refused = file_spec(handler)
        opts = self.opts
        self._curve: Optional[CurveKeys] = None
        if str(opts.endpoint).startswith("tcp://") and (opts.curve_server_key or opts.curve_secret_key):
            if not (opts.curve_server_key and opts.curve_secret_key):
                raise ValueError(f"{self.KIND}: CURVE needs both curve_server_key and curve_secret_key")
            try:
                self._curve = CurveKeys(opts.curve_server_key, opts.curve_secret_key)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{self.KIND}: cannot read the CURVE keys: {exc}") from None
        super().__init__(self.opts.level)
        self.handler = handler
        self.path, self.options = path, file_options
        self.endpoint: Optional[str] = None if refused else self.opts.endpoint
        if refused and self.opts.endpoint is not None:
            warnings.warn(f"clh-writerd: the daemon would refuse {path} ({refused}); "
                          "this handler writes it through the fallback", RuntimeWarning, stacklevel=3)
        self._refused = refused if self.opts.endpoint is not None else ""
        self._trust = EndpointTrust(self.endpoint, opts.daemon_user, opts.socket_group, self._curve is not None,
                                    opts.tcp_auth) if self.endpoint else None
        # Read on every emit(): plain attributes.
        self.queue_size = self.opts.queue_size
        self.sync_level = self.opts.sync_level
        self.drain_timeout = self.opts.drain_timeout
        if handler.formatter is not None and self.formatter is None:
            super().setFormatter(handler.formatter)
        # Field values travel when a daemon may render them (it is told so
        # at every connection; values meet any other daemon as lines).
        self._items = ItemMaker(handler, fields=self.opts.daemon_render and self.endpoint is not None)
        self._closed = False
        self._new_process_state()
        self._pid = os.getpid()

    # -- per-process state (rebuilt in a forked child) -------------------------
    def _new_process_state(self) -> None:
        """Everything that belongs to one process (``_pid`` says which, and
        is set by the caller once all of it is built)."""
        self.stats = ClientStats()
        self.stats.state = STATE_EMBEDDED if self.endpoint is None else self.stats.state
        self.stats.last_error = self._refused
        self._client_id = protocol.new_client_id()
        self._fallback = Fallback(self.handler, self.stats)
        self._confirmed = Confirmed(None, self._fallback, self.stats)
        self._context: Optional[zmq.Context] = None
        self._transport: Optional[ZmqTransport] = None
        self._batches: Optional[BatchLane] = None  # the current run's batch lane (Delivery closes it)
        self._core = None
        self._queue: Deque[Any] = deque()  # prepared records and Flush markers
        _process.account(self)

    def _open_transport(self) -> None:
        """The context and the transport (with a daemon): its sync lane is
        usable from now on, its batch lane from the sender's first run."""
        if self.endpoint is not None and self._context is None:
            self._context = zmq.Context()
            # Every socket of the handler: a reply larger than this is dropped by libzmq, never buffered.
            self._context.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_HANDLER_REPLY_BYTES)
            self._transport = ZmqTransport(self._context, self.endpoint, self.opts, self.stats, self._client_id,
                                           self.path, self.options, self._trust, self._curve)
            self._confirmed.sync = self._transport.sync

    def _new_core(self) -> SenderCore:
        """Sockets (with a daemon) and the sender core, for one run of the sender."""
        self._open_transport()
        self._batches = self._transport.batch_lane() if self._transport is not None else None
        delivery = Delivery(self.opts, self.stats, self.path, self.options, self._client_id, self._batches)
        self._core = SenderCore(delivery, self._items, self.stats, self._render_failed, summary=self.get_stats,
                                monitor_interval=self.opts.monitor_interval)
        return self._core

    def _release_sockets(self) -> None:
        """After the sender ended (its batch lane closed with it): the sync lane and the context."""
        if self._transport is not None:
            self._transport.release()
        self._transport = self._batches = self._confirmed.sync = None
        if self._context is not None:
            self._context.term()
            self._context = None

    # -- process hooks (_process) ------------------------------------------------
    def mark_forked(self) -> None:
        """In a forked child: the next emit() rebuilds the per-process state."""
        self._pid = -1

    def belongs_here(self) -> bool:
        return self._pid == os.getpid()

    def loop_runs_here(self) -> bool:
        """An asyncio handler whose event loop runs on this thread."""
        return False

    def _rebuild_in_child(self) -> None:
        """First use in a forked child, from any thread: one thread rebuilds
        the per-process state (``_rebuild``), the others wait for it. Two
        threads of a fresh gunicorn gthread worker rebuilt it at once: one's
        records went to a queue the other then replaced."""
        with _process.CHILD_REBUILD:
            if self._pid == os.getpid():
                return  # another thread did it meanwhile
            self._rebuild()
            self._pid = os.getpid()  # last: a thread that sees it finds everything built

    def _rebuild(self) -> None:
        self._new_process_state()

    def stop(self, timeout: Optional[float] = None) -> bool:
        raise NotImplementedError

    def park_for_fork(self, deadline: float) -> None:
        """Before fork(): park this handler's own threads (see _process)."""

    def resume_after_fork(self) -> None:
        """After fork(), in the parent: let them go on."""

    # -- logging.Handler ---------------------------------------------------------
    def setFormatter(self, fmt: Optional[logging.Formatter]) -> None:
        # The wrapped handler renders every line (daemon and fallback paths
        # alike), so it must use the same formatter.
        super().setFormatter(fmt)
        self.handler.setFormatter(fmt)

    def handle(self, record: logging.LogRecord) -> Any:
        # What a handler says about itself never goes through a handler of
        # ours (a root-logger handler would write its own fallback warnings
        # with the path they warn about, or loop); _notices.emit sends it
        # to stderr when no other handler is configured.
        if record.name == _OWN_LOGGER:
            return False
        # emit() is thread-safe without Handler.lock: skip taking it.
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):
            record = rv
        if rv:
            self.emit(record)
        return rv

    def get_stats(self) -> Dict[str, Any]:
        """Queue and delivery counters (see docs/client.md for each key)."""
        in_flight = self._core.delivery.in_flight if self._core is not None else 0
        return self.stats.snapshot(len(self._queue), self.queue_size, in_flight)

    def _check_startable(self, started: bool) -> None:
        if started:
            raise RuntimeError("handler already started")
        if self._closed:
            raise RuntimeError("handler is closed")

    def _close_wrapped(self, close_file: bool = True) -> None:
        """Closed for good; ``close_file=False``: the sender still writes,
        it closes the file itself when it ends (``_close_file``)."""
        self._closed = True
        _process.unregister(self)
        try:
            if close_file:
                self._close_file()
        finally:
            super().close()

    def _close_file(self) -> None:
        """Close the wrapped handler's files once no write is in progress
        (bounded: a write stuck on the disk leaves them open, and says so)."""
        if not self._fallback.writer.close(timeout=CLOSE_WAIT):
            self.stats.last_error = f"close: a write still held the file after {CLOSE_WAIT}s; left open"

    # -- policies shared by both handlers ------------------------------------------
    def _after_close(self, record: logging.LogRecord) -> None:
        """A record emitted after close(): written through the fallback, as
        FileHandler reopens its file; counted. If even that fails it is lost:
        counted, and handleError (the caller's) says why."""
        self.stats.closed_count += 1
        if not self._fallback.write([self._items.finish_now(record)]):
            self.stats.lose(1, self.stats.last_error)
            raise OSError(self.stats.last_error) from self._fallback.error

    def _render_failed(self, item: Any) -> None:
        self.handleError(record_of(item))

    def _drop(self, item: Any, policy: str) -> None:
        """Count a record refused by policy; at the first drop and every
        DROP_WARNING_EVERY, a warning through the sender: a line in the file
        and a notice on the ``clh_writerd.client`` logger (neither written
        here: dropping must not make the caller wait for the disk)."""
        self.stats.dropped_count += 1
        dropped = self.stats.dropped_count
        if (dropped == 1 or dropped % DROP_WARNING_EVERY == 0) and self._core is not None:
            if dropped % DROP_WARNING_EVERY == 0:
                self._core.warn(self._warning_line(record_of(item), "queue full, %d records dropped so far (%s)",
                                                   dropped, policy))
            self._core.notify(logging.WARNING, _notices.drop_message(self.path, dropped, policy, self.KIND))
            self._wake()

    def _wake(self) -> None:
        """Make the sender look at its queue (subclasses)."""

    def _warning_line(self, near: logging.LogRecord, msg: str, *args: Any) -> Item:
        """A WARNING line about the handler itself (drops, blocking), dated like ``near``."""
        record = logging.makeLogRecord({
            "name": "clh_writerd", "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "clh-writerd: " + msg, "args": args, "created": near.created, "msecs": near.msecs,
        })
        return self._items.finish_now(record, self.stats.record_limit)


def build_clh(filename: Any, use_timed: bool, kwargs: Dict[str, Any]) -> CLHHandler:
    """The CLH handler a factory wraps (an absolute path: the daemon needs one)."""
    path = os.path.abspath(os.fspath(filename))
    if use_timed:
        return ConcurrentTimedRotatingFileHandler(path, **kwargs)
    return ConcurrentRotatingFileHandler(path, **kwargs)
