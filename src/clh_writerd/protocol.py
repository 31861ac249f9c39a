"""The wire contract between clh-writerd clients and the daemon.

This is the only module both sides import for the wire: message types, field
names, limits, encoding, decoding and validation. It deliberately imports no
zmq and no logging handler, so it can be tested and fuzzed on its own.
`docs/protocol.md` describes the same contract for humans; keep them together.

Every message is one msgpack map with at least ``v`` (the protocol version)
and ``type``. Decoding untrusted bytes raises only :class:`ProtocolError`.
"""

import codecs
import os
import re
import socket
import sys
import uuid
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import msgpack

from ._fieldformat import FieldFormat, RecordTooLarge

# Version 2 adds the "fields" render mode (the daemon renders the line);
# every other message keeps version 1's shape and is still sent as
# version 1, so a version-1 daemon answers this client's pings and a
# version-1 client talks to this daemon unchanged. A daemon tells the
# version it speaks in its ping reply (``protocol``).
PROTOCOL_VERSION = 2
LINES_VERSION = 1
SUPPORTED_VERSIONS = (1, 2)

# -- limits ---------------------------------------------------------------
# One frame may hold at most this many bytes; the daemon also sets it as
# ZMQ_MAXMSGSIZE so an oversize frame never reaches Python.
MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_RECORDS_PER_BATCH = 20000
# One rendered record (a formatted line, traceback included), in UTF-8 bytes.
MAX_RECORD_BYTES = 1024 * 1024
MAX_PATH_BYTES = 4096
MAX_NAME_CHARS = 256  # host, program, session, option strings
MAX_MAP_ENTRIES = 64
MAX_COUNTERS = 32
MAX_REPLY_ENTRIES = 100000
# Arrays and maps one request may hold, nested ones included: a batch's
# records, and in "fields" mode each record's values and its time (two per
# record). Checked while decoding a frame larger than CHECKED_FRAME_BYTES
# (an empty array is one byte on the wire and 56 in memory: an 8 MiB frame of
# them cost 626 MB and 2.5 s); a smaller frame cannot hold enough to matter.
MAX_CONTAINERS = 2 * MAX_RECORDS_PER_BATCH + MAX_MAP_ENTRIES
CHECKED_FRAME_BYTES = 64 * 1024
# Largest reply a handler's sockets accept (ZMQ_MAXMSGSIZE): acks, errors,
# ping and report answers are well under it; a stats document travels only
# to `clh-writerd stats` (control.request), whose limit is MAX_FRAME_BYTES.
MAX_HANDLER_REPLY_BYTES = 64 * 1024
MAX_INT = 2**63 - 1


class ClientCounter(NamedTuple):
    """A counter a client keeps about itself, declared once (``CLIENT_COUNTERS``):
    ``get_stats()`` and the handlers' ``ClientStats``, the report, what the
    daemon keeps, its metrics, `clh-writerd stats`' client table, the
    handler's summary line and docs/client.md's table all come from here."""

    name: str  # the get_stats() key (a ClientStats attribute)
    wire: str  # its name in a report and on the daemon's side; "": kept in the process only
    help: str  # what it counts (docs/client.md, the Prometheus help)
    column: bool = False  # shown in `clh-writerd stats`' client table
    summary: bool = False  # shown in the handler's monitor_interval summary line


CLIENT_COUNTERS: Tuple[ClientCounter, ...] = (
    ClientCounter("enqueued", "", "records accepted into the queue"),
    ClientCounter("sent", "sent", "records sent to the daemon (resends included)", column=True, summary=True),
    ClientCounter("acked", "acked", "records the daemon acknowledged as written", column=True, summary=True),
    ClientCounter("fallback_written", "fallback",
                  "records written directly through CLH: fallback, embedded mode, sync records without a daemon",
                  column=True, summary=True),
    ClientCounter("dropped_count", "dropped",
                  "records dropped because the queue was full and `fallback_on_full=False`", column=True,
                  summary=True),
    ClientCounter("resent", "resent",
                  "records that were sent but never acknowledged, then written again (fallback) or sent again; "
                  "with `sync_timeouts`, an upper bound on duplicates", column=True, summary=True),
    ClientCounter("fallback_count", "queue_full", "records written synchronously because the queue was full",
                  summary=True),
    ClientCounter("sync_count", "", "records at or above `sync_level`"),
    ClientCounter("sync_timeouts", "sync_timeouts",
                  "sync records the daemon did not confirm in time; the fallback wrote them, so a duplicate is "
                  "possible"),
    ClientCounter("busy", "",
                  "batches the daemon refused as busy; they are sent again after a back-off (10 ms doubling to "
                  "1 s), and never count as `resent` since nothing of them was written"),
    ClientCounter("write_errors", "write_errors",
                  "direct writes that failed (attempts, not records: a failure that may pass, such as a full disk "
                  "or a held lock, is retried)", summary=True),
    ClientCounter("lost", "lost",
                  "records that could not be written anywhere: neither the daemon nor the fallback took them (a "
                  "directory that cannot be created, no permission, a lock held past `LOCK_WAIT`, a write still "
                  "failing after 10 s or at the drain's deadline). Each loss is said on stderr (see "
                  "[Loss](#loss))", summary=True),
    ClientCounter("oversize", "oversize", "records too large for one message, written through the fallback",
                  summary=True),
    ClientCounter("unencodable", "unencodable",
                  "records whose text is not UTF-8 (lone surrogates, as `os.fsdecode()` makes of undecodable "
                  "bytes), which msgpack cannot carry: written through the fallback, under the file's "
                  "`unicode_error_policy`, the same bytes CLH writes", summary=True),
    ClientCounter("closed_count", "",
                  "records emitted after `close()`: written through the fallback (as `FileHandler` reopens its "
                  "file), never a traceback"),
)
# The counters a client may report about itself (``report`` messages); the
# daemon keeps only these names, so a client cannot grow its stats document.
REPORT_COUNTERS: Tuple[str, ...] = tuple(c.wire for c in CLIENT_COUNTERS if c.wire)
# What a report may say about the client's state (client/_stats.py), and how
# much of its last error the daemon keeps.
REPORT_STATES = ("connecting", "daemon", "fallback", "embedded", "stopped")
MAX_REPORT_ERROR_CHARS = 256

# -- message and reply types ----------------------------------------------
T_BATCH = "batch"
T_SYNC = "sync"
T_STATS = "stats"
T_PING = "ping"
T_REPORT = "report"
T_ACK = "ack"
T_OK = "ok"
T_ERROR = "error"

RENDER_LINES = "lines"  # records are formatted lines without terminator
# Version 2: the batch carries a ``format`` (a stock logging.Formatter as
# data, see _fieldformat.FieldFormat) and each record is either a formatted line
# (rendered by the client: exc_info, a value the daemon cannot reproduce) or
# the list of the format's field values, rendered by the daemon.
RENDER_FIELDS = "fields"
RENDER_MODES = (RENDER_LINES, RENDER_FIELDS)
# Validated formats, by their wire form: a client sends the same one in
# every batch, and validating it each time would cost more than rendering.
MAX_CACHED_FORMATS = 256
_formats: Dict[Tuple[Any, ...], FieldFormat] = {}

# -- stable error codes ---------------------------------------------------
E_MALFORMED = "malformed"  # not msgpack, wrong shape, wrong types
E_VERSION = "unsupported_version"
E_UNKNOWN_TYPE = "unknown_type"
E_TOO_LARGE = "too_large"  # a limit above was exceeded
E_FORBIDDEN_PATH = "forbidden_path"  # outside allowed_dirs, relative, '..', NUL, symlink escape
E_BAD_OPTIONS = "bad_options"  # unknown option or value out of range
E_BUSY = "busy"  # the file's queue is full: retry later (backpressure)
E_WRITE_FAILED = "write_failed"  # the write raised (disk full, permissions, ...)
E_SHUTTING_DOWN = "shutting_down"
E_INTERNAL = "internal"  # the daemon failed on this message; it keeps serving the others
E_OPTIONS_CONFLICT = "options_conflict"  # the file is already served with other options
E_UNAUTHORIZED = "unauthorized"  # the peer (uid from the kernel, or CURVE key) may not use this daemon or path

ERROR_CODES = (
    E_MALFORMED,
    E_VERSION,
    E_UNKNOWN_TYPE,
    E_TOO_LARGE,
    E_FORBIDDEN_PATH,
    E_BAD_OPTIONS,
    E_BUSY,
    E_WRITE_FAILED,
    E_SHUTTING_DOWN,
    E_INTERNAL,
    E_OPTIONS_CONFLICT,
    E_UNAUTHORIZED,
)
# A client may send the same records again later after one of these; the
# others mean "this daemon will never write it": use the fallback.
RETRYABLE_ERRORS = frozenset((E_BUSY, E_WRITE_FAILED, E_SHUTTING_DOWN))


# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and
# bidi overrides: anything that could move a terminal's cursor, forge a log
# line or reorder what a reader sees.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``, ``\\u2028``),
    for anything the other side sent that ends up on a terminal or in a log."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class ProtocolError(Exception):
    """Raised for anything that is not a valid message; carries a stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- CLH options ------------------------------------------------------------
# name -> (accepted types, lower bound, upper bound). Bounds keep a hostile or
# mistaken client from asking for a million backups or a zero-second interval.
_INT = (int,)
_STR = (str,)
_BOOL = (bool,)
FILE_OPTIONS: Dict[str, Tuple[Tuple[type, ...], Any, Any]] = {
    "maxBytes": (_INT, 0, 1 << 44),
    "backupCount": (_INT, 0, 1000),
    "use_gzip": (_BOOL, None, None),
    "encoding": (_STR, None, None),
    "chmod": (_INT, 0, 0o7777),
    "umask": (_INT, 0, 0o777),
    "newline": (_STR, None, None),
    "terminator": (_STR, None, None),
    "unicode_error_policy": (_STR, None, None),
    "lock_file_directory": (_STR, None, None),
    "owner": ((list,), None, None),
    # Present only for ConcurrentTimedRotatingFileHandler.
    "when": (_STR, None, None),
    "interval": (_INT, 1, 10**7),
    "utc": (_BOOL, None, None),
}
WHEN_VALUES = ("S", "M", "H", "D", "MIDNIGHT") + tuple(f"W{i}" for i in range(7))
# How a tcp endpoint is authenticated (the daemon's tcp_auth; a handler's must match).
TCP_AUTH = ("curve", "none")
UNICODE_POLICIES = ("ignore", "replace", "strict")


def check_file_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate a file's CLH options and return them as a plain dict.

    Raises ProtocolError(E_BAD_OPTIONS) naming the first offending option.
    """
    out: Dict[str, Any] = {}
    for name, value in options.items():
        spec = FILE_OPTIONS.get(name)
        if spec is None:
            raise ProtocolError(E_BAD_OPTIONS, f"unknown option {name!r}")
        types, low, high = spec
        # bool is an int subclass; an int option must not accept True.
        if type(value) not in types:
            raise ProtocolError(E_BAD_OPTIONS, f"option {name!r} has type {type(value).__name__}")
        if low is not None and not (low <= value <= high):
            raise ProtocolError(E_BAD_OPTIONS, f"option {name!r}={value!r} is outside [{low}, {high}]")
        if isinstance(value, str) and (len(value) > MAX_PATH_BYTES or "\x00" in value):
            raise ProtocolError(E_BAD_OPTIONS, f"option {name!r} is too long or holds NUL")
        out[name] = value
    if "encoding" in out:
        try:
            info = codecs.lookup(out["encoding"])
        except LookupError:
            raise ProtocolError(E_BAD_OPTIONS, f"unknown encoding {out['encoding']!r}") from None
        if not getattr(info, "_is_text_encoding", True):  # rot13, base64, ...: open() refuses them
            raise ProtocolError(E_BAD_OPTIONS, f"encoding {out['encoding']!r} is not a text encoding")
    if out.get("newline") not in (None, "", "\n", "\r", "\r\n"):
        raise ProtocolError(E_BAD_OPTIONS, "newline must be one of None, '', '\\n', '\\r', '\\r\\n'")
    if "terminator" in out and not (1 <= len(out["terminator"]) <= 4):
        raise ProtocolError(E_BAD_OPTIONS, "terminator must be 1 to 4 characters")
    if out.get("unicode_error_policy", "ignore") not in UNICODE_POLICIES:
        raise ProtocolError(E_BAD_OPTIONS, f"unicode_error_policy must be one of {UNICODE_POLICIES}")
    if "when" in out and out["when"].upper() not in WHEN_VALUES:
        raise ProtocolError(E_BAD_OPTIONS, f"when must be one of {WHEN_VALUES}")
    if ("interval" in out or "utc" in out) and "when" not in out:
        raise ProtocolError(E_BAD_OPTIONS, "interval and utc need when (a timed rotating file)")
    owner = out.get("owner")
    if owner is not None and not (
        len(owner) == 2 and all(type(x) is str and 0 < len(x) <= MAX_NAME_CHARS for x in owner)
    ):
        raise ProtocolError(E_BAD_OPTIONS, "owner must be [user, group]")
    return out


def options_key(options: Mapping[str, Any]) -> Tuple[Tuple[str, Any], ...]:
    """A hashable, order-independent form of validated options."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


# -- decoded messages -------------------------------------------------------
class ClientId(NamedTuple):
    """Who sent a message: one per client process (session changes on fork)."""

    host: str
    pid: int
    program: str
    session: str


Record = Union[str, List[Any], Tuple[Any, ...]]  # a line, or field values (render "fields")


class Batch(NamedTuple):
    client: ClientId
    seq: int
    path: str
    options: Dict[str, Any]
    render: str
    records: List[Record]
    format: Optional[FieldFormat] = None  # render "fields" only

    def lines(self, on_error: Optional[Callable[[], None]] = None) -> List[str]:
        """The records as lines (the daemon renders field values here)."""
        return render_records(self.format, self.records, on_error)


class SyncRecord(NamedTuple):
    client: ClientId
    id: int
    path: str
    options: Dict[str, Any]
    render: str
    record: Record
    format: Optional[FieldFormat] = None

    def lines(self, on_error: Optional[Callable[[], None]] = None) -> List[str]:
        return render_records(self.format, [self.record], on_error)


def render_records(fmt: Optional[FieldFormat], records: List[Record],
                   on_error: Optional[Callable[[], None]] = None) -> List[str]:
    """Lines from records: field values through ``fmt``. A record the format
    cannot render (a ``%d`` given a string: the client's formatter would
    have raised too) becomes a line saying so, with its values: never lost."""
    if fmt is None:
        return records  # type: ignore[return-value]

    def failed(exc: Exception, values: Any) -> str:
        if on_error is not None:
            on_error()
        return render_error_line(exc, values)

    return fmt.lines(records, failed)


RENDER_ERROR_PREFIX = "clh-writerd: cannot render a record"


def render_error_line(exc: BaseException, values: Any) -> str:
    return f"{RENDER_ERROR_PREFIX} ({type(exc).__name__}: {exc}): {values!r}"[:MAX_RECORD_BYTES // 16]


class StatsRequest(NamedTuple):
    id: int


class Ping(NamedTuple):
    id: int


class Report(NamedTuple):
    """A client's own counters (dropped, fallback writes, resent, ...), and
    optionally its state, target file, last error, and whether it is the
    final report sent at close()."""

    client: ClientId
    id: int
    counters: Dict[str, int]
    state: Optional[str] = None
    file: Optional[str] = None
    error: Optional[str] = None
    final: bool = False


class Ack(NamedTuple):
    seq: int


class Ok(NamedTuple):
    id: int
    data: Dict[str, Any]


class Error(NamedTuple):
    code: str
    message: str
    seq: Optional[int] = None
    id: Optional[int] = None

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_ERRORS


Request = Union[Batch, SyncRecord, StatsRequest, Ping, Report]
Reply = Union[Ack, Ok, Error]


# -- identity -----------------------------------------------------------
def new_client_id(program: Optional[str] = None) -> ClientId:
    """The identity of this process; call again after fork for a new session."""
    prog = program or os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python")
    return ClientId(
        _utf8(socket.gethostname())[:MAX_NAME_CHARS],
        os.getpid(),
        _utf8(prog)[:MAX_NAME_CHARS] or "python",
        uuid.uuid4().hex,
    )


def _utf8(name: str) -> str:
    """``name`` as text msgpack can carry: a lone surrogate (an undecodable
    byte of a script's file name, say) is shown escaped."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def default_endpoint() -> str:
    """The endpoint client and daemon agree on without configuration.

    ``CLH_WRITERD_ENDPOINT`` wins; otherwise an ipc socket in the per-user
    runtime directory (``$XDG_RUNTIME_DIR/clh-writerd``, else
    ``/tmp/clh-writerd-<uid>``).
    """
    env = os.environ.get("CLH_WRITERD_ENDPOINT")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        directory = os.path.join(runtime, "clh-writerd")
    else:
        directory = os.path.join("/tmp", f"clh-writerd-{os.getuid()}")
    return "ipc://" + os.path.join(directory, "writerd.sock")


# -- encoding ---------------------------------------------------------------
def _client_map(client: ClientId) -> Dict[str, Any]:
    return {"host": client.host, "pid": client.pid, "program": client.program, "session": client.session}


def _file_map(path: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    return {"path": path, "options": dict(options)}


def encode_batch(
    client: ClientId,
    seq: int,
    path: str,
    options: Mapping[str, Any],
    records: Sequence[Union[Record, bytes]],
    render: str = RENDER_LINES,
    format: Optional[FieldFormat] = None,
    packed: bool = False,
) -> bytes:
    """A batch frame. ``packed``: each record is already msgpack (bytes), as a
    client keeps records in flight; the frame is the same as for the records
    unpacked."""
    msg = {
        "v": LINES_VERSION,
        "type": T_BATCH,
        "client": _client_map(client),
        "seq": seq,
        "file": _file_map(path, options),
        "render": render,
    }
    if format is not None:
        msg.update(v=PROTOCOL_VERSION, render=RENDER_FIELDS, format=format.wire())
    if not packed:
        msg["records"] = records
        return msgpack.packb(msg)
    packer = msgpack.Packer()
    parts = [packer.pack_map_header(len(msg) + 1)]
    for key, value in msg.items():
        parts += (packer.pack(key), packer.pack(value))
    parts += (packer.pack("records"), packer.pack_array_header(len(records)))
    parts += records  # type: ignore[arg-type]
    return b"".join(parts)


def encode_sync(
    client: ClientId,
    id: int,
    path: str,
    options: Mapping[str, Any],
    record: Record,
    render: str = RENDER_LINES,
    format: Optional[FieldFormat] = None,
) -> bytes:
    return SyncFrame(client, path, options, render, format).encode(id, record)


class SyncFrame:
    """Sync-record frames of one client for one file: everything but the id
    and the record packed once (the REQ path packs only those per call)."""

    def __init__(self, client: ClientId, path: str, options: Mapping[str, Any], render: str = RENDER_LINES,
                 format: Optional[FieldFormat] = None) -> None:
        msg = {
            "v": LINES_VERSION,
            "type": T_SYNC,
            "client": _client_map(client),
            "file": _file_map(path, options),
            "render": render,
        }
        if format is not None:
            msg.update(v=PROTOCOL_VERSION, render=RENDER_FIELDS, format=format.wire())
        packer = msgpack.Packer()
        parts = [packer.pack_map_header(len(msg) + 2)]
        for key, value in msg.items():
            parts += (packer.pack(key), packer.pack(value))
        self._head = b"".join(parts) + packer.pack("id")
        self._record_key = packer.pack("record")

    def encode(self, id: int, record: Record) -> bytes:
        return b"".join((self._head, msgpack.packb(id), self._record_key, msgpack.packb(record)))


def encode_stats_request(id: int = 0) -> bytes:
    return msgpack.packb({"v": LINES_VERSION, "type": T_STATS, "id": id})


def encode_ping(id: int = 0) -> bytes:
    return msgpack.packb({"v": LINES_VERSION, "type": T_PING, "id": id})


def encode_report(client: ClientId, counters: Mapping[str, int], id: int = 0, state: Optional[str] = None,
                  file: Optional[str] = None, error: Optional[str] = None, final: bool = False) -> bytes:
    """A client's report about itself; the optional keys are left out when
    not given (an older daemon ignores them anyway)."""
    msg: Dict[str, Any] = {"v": LINES_VERSION, "type": T_REPORT, "client": _client_map(client), "id": id,
                           "counters": dict(counters)}
    if state is not None:
        msg["state"] = state
    if file is not None:
        msg["file"] = file
    if error is not None:
        msg["error"] = error[:MAX_REPORT_ERROR_CHARS]
    if final:
        msg["final"] = True
    return msgpack.packb(msg)


# Replies keep version 1's shape and number: a version-1 client reads them.
def encode_ack(seq: int) -> bytes:
    return msgpack.packb({"v": LINES_VERSION, "type": T_ACK, "seq": seq})


def encode_ok(id: int = 0, data: Optional[Mapping[str, Any]] = None, packed_data: Optional[bytes] = None) -> bytes:
    """An ok reply; ``packed_data``: its data already packed (a stats document
    the daemon encodes once and sends to many requests), the same frame."""
    if packed_data is None:
        return msgpack.packb({"v": LINES_VERSION, "type": T_OK, "id": id, "data": dict(data or {})})
    head = msgpack.packb({"v": LINES_VERSION, "type": T_OK, "id": id})  # a fixmap of 3 (0x83): one more key
    return b"\x84" + head[1:] + msgpack.packb("data") + packed_data


def encode_error(code: str, message: str, seq: Optional[int] = None, id: Optional[int] = None) -> bytes:
    msg: Dict[str, Any] = {"v": LINES_VERSION, "type": T_ERROR, "code": code, "message": message[:1000]}
    if seq is not None:
        msg["seq"] = seq
    if id is not None:
        msg["id"] = id
    return msgpack.packb(msg)


# -- decoding -----------------------------------------------------------
class _ContainerBudget:
    """msgpack's list_hook and object_hook: counts the arrays and maps a frame
    has made so far and stops the decoding past ``limit``, before the next
    ones are allocated (msgpack checks each container's length, not their number)."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ValueError(f"frame exceeds max_containers({MAX_CONTAINERS})")
        return value


def _unpack(data: bytes, max_array: int, max_map: int = MAX_MAP_ENTRIES,
            max_containers: Optional[int] = None) -> Dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(E_MALFORMED, "frame is not bytes")
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(E_TOO_LARGE, f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    hooks: Dict[str, Any] = {}
    if max_containers is not None and len(data) > CHECKED_FRAME_BYTES:
        budget = _ContainerBudget(max_containers)
        hooks = {"list_hook": budget, "object_hook": budget}
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_RECORD_BYTES,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=max_array,
            max_map_len=max_map,
            **hooks,
        )
    except ValueError as exc:
        # msgpack reports exceeded limits as ValueError("... exceeds max_...").
        # bin and ext are refused by a zero limit: that is a wrong type, not a size.
        code = E_TOO_LARGE if "exceeds max" in str(exc) and "_len(0)" not in str(exc) else E_MALFORMED
        raise ProtocolError(code, f"cannot decode frame: {exc}") from None
    except Exception as exc:  # untrusted bytes: nothing but ProtocolError escapes
        raise ProtocolError(E_MALFORMED, f"cannot decode frame: {type(exc).__name__}: {exc}") from None
    if type(obj) is not dict:
        raise ProtocolError(E_MALFORMED, "a message is a map")
    version = obj.get("v")
    if type(version) is not int:
        raise ProtocolError(E_MALFORMED, "missing protocol version 'v'")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(E_VERSION, f"protocol version {version} is not supported (this side speaks "
                                       f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    return obj


def _field(obj: Mapping[str, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if type(value) is not kind:
        raise ProtocolError(E_MALFORMED, f"field {name!r} must be {kind.__name__}")
    return value


def _int_field(obj: Mapping[str, Any], name: str, default: Optional[int] = None) -> int:
    if default is not None and name not in obj:
        return default
    value = _field(obj, name, int)
    if not (0 <= value <= MAX_INT):
        raise ProtocolError(E_MALFORMED, f"field {name!r} is out of range")
    return value


def _name(obj: Mapping[str, Any], name: str) -> str:
    value = _field(obj, name, str)
    if len(value) > MAX_NAME_CHARS:
        raise ProtocolError(E_TOO_LARGE, f"field {name!r} is longer than {MAX_NAME_CHARS}")
    return value


def _client(obj: Mapping[str, Any]) -> ClientId:
    c = _field(obj, "client", dict)
    return ClientId(_name(c, "host"), _int_field(c, "pid"), _name(c, "program"), _name(c, "session"))


def _file(obj: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    f = _field(obj, "file", dict)
    path = _field(f, "path", str)
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ProtocolError(E_TOO_LARGE, f"path is longer than {MAX_PATH_BYTES} bytes")
    options = _field(f, "options", dict)
    for value in options.values():
        # Options are scalars, or owner's [user, group]; nothing deeper.
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(x, (list, dict)) for x in value)):
            raise ProtocolError(E_MALFORMED, "file options must be scalars")
    return path, options


def _render(obj: Mapping[str, Any]) -> Tuple[str, Optional[FieldFormat]]:
    render = _field(obj, "render", str)
    if render not in RENDER_MODES:
        raise ProtocolError(E_MALFORMED, f"render mode {render!r} is not one of {RENDER_MODES}")
    if render == RENDER_LINES:
        return render, None
    if obj["v"] < 2:
        raise ProtocolError(E_MALFORMED, "render mode 'fields' needs protocol version 2")
    return render, check_format(obj.get("format"))


def check_format(spec: Any) -> FieldFormat:
    """A validated FieldFormat from its wire form (cached); ProtocolError if refused."""
    if type(spec) is not dict:
        raise ProtocolError(E_MALFORMED, "field 'format' must be a map")
    try:
        key = tuple(spec.get(k) for k in ("style", "fmt", "datefmt", "tfmt", "mfmt")) + (len(spec),)
        cached = _formats.get(key)
        if cached is not None:
            return cached
        fmt = FieldFormat.from_wire(spec)
    except (ValueError, TypeError) as exc:  # TypeError: an unhashable value in the key
        raise ProtocolError(E_MALFORMED, f"format refused: {exc}") from None
    if len(_formats) >= MAX_CACHED_FORMATS:
        _formats.clear()
    _formats[key] = fmt
    return fmt


def _check_record(record: Any, fmt: Optional[FieldFormat] = None) -> Record:
    _check_records((record,), fmt)
    return record  # type: ignore[no-any-return]


def _check_records(records: Sequence[Any], fmt: Optional[FieldFormat]) -> None:
    """Lines only, or lines and field values ``fmt`` can render within the record limit."""
    if fmt is None:
        for record in records:
            if type(record) is not str:
                raise ProtocolError(E_MALFORMED, "a record must be a string")
        return
    try:
        fmt.check_records(records, MAX_RECORD_BYTES)
    except RecordTooLarge as exc:
        raise ProtocolError(E_TOO_LARGE, str(exc)) from None
    except ValueError as exc:
        raise ProtocolError(E_MALFORMED, f"record values refused: {exc}") from None


def _report_extras(obj: Mapping[str, Any]) -> Tuple[Optional[str], Optional[str], Optional[str], bool]:
    """A report's optional state, file, error and final keys, checked."""
    state = obj.get("state")
    if state is not None and state not in REPORT_STATES:
        raise ProtocolError(E_MALFORMED, f"report state must be one of {REPORT_STATES}")
    path = obj.get("file")
    if path is not None:
        if type(path) is not str:
            raise ProtocolError(E_MALFORMED, "field 'file' must be str")
        if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise ProtocolError(E_TOO_LARGE, f"path is longer than {MAX_PATH_BYTES} bytes")
    error = obj.get("error")
    if error is not None:
        if type(error) is not str:
            raise ProtocolError(E_MALFORMED, "field 'error' must be str")
        error = error[:MAX_REPORT_ERROR_CHARS]
    final = obj.get("final", False)
    if type(final) is not bool:
        raise ProtocolError(E_MALFORMED, "field 'final' must be bool")
    return state, path, error, final


def decode_request(data: bytes) -> Request:
    """Decode a client->daemon frame; raises only ProtocolError."""
    obj = _unpack(data, MAX_RECORDS_PER_BATCH, max_containers=MAX_CONTAINERS)
    kind = obj.get("type")
    if kind == T_BATCH:
        records = _field(obj, "records", list)
        render, fmt = _render(obj)
        _check_records(records, fmt)
        path, options = _file(obj)
        return Batch(_client(obj), _int_field(obj, "seq"), path, options, render, records, fmt)
    if kind == T_SYNC:
        path, options = _file(obj)
        render, fmt = _render(obj)
        record = _check_record(obj.get("record"), fmt)
        return SyncRecord(_client(obj), _int_field(obj, "id"), path, options, render, record, fmt)
    if kind == T_STATS:
        return StatsRequest(_int_field(obj, "id", 0))
    if kind == T_PING:
        return Ping(_int_field(obj, "id", 0))
    if kind == T_REPORT:
        counters = _field(obj, "counters", dict)
        if len(counters) > MAX_COUNTERS:
            raise ProtocolError(E_TOO_LARGE, f"more than {MAX_COUNTERS} counters")
        for name, value in counters.items():
            if len(name) > MAX_NAME_CHARS:
                raise ProtocolError(E_TOO_LARGE, f"counter name is longer than {MAX_NAME_CHARS}")
            if type(value) is not int or not (0 <= value <= MAX_INT):
                raise ProtocolError(E_MALFORMED, "counters map names to non-negative ints")
        return Report(_client(obj), _int_field(obj, "id", 0), counters, *_report_extras(obj))
    if type(kind) is not str:
        raise ProtocolError(E_MALFORMED, "field 'type' must be str")
    raise ProtocolError(E_UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}")


def decode_reply(data: bytes) -> Reply:
    """Decode a daemon->client frame; raises only ProtocolError."""
    # Replies come from the daemon and may carry a stats document with one
    # entry per file and client, hence the wider container limits.
    obj = _unpack(data, MAX_REPLY_ENTRIES, MAX_REPLY_ENTRIES)
    kind = obj.get("type")
    if kind == T_ACK:
        return Ack(_int_field(obj, "seq"))
    if kind == T_OK:
        data_field = obj.get("data", {})
        if type(data_field) is not dict:
            raise ProtocolError(E_MALFORMED, "field 'data' must be a map")
        return Ok(_int_field(obj, "id", 0), data_field)
    if kind == T_ERROR:
        seq = _int_field(obj, "seq") if "seq" in obj else None
        id_ = _int_field(obj, "id") if "id" in obj else None
        # Escaped here: a client puts the daemon's words in its warnings and stats.
        return Error(printable(_field(obj, "code", str)[:64]), printable(_field(obj, "message", str)), seq, id_)
    raise ProtocolError(E_UNKNOWN_TYPE, f"unknown reply type {str(kind)[:64]!r}")


__all__ = [
    "PROTOCOL_VERSION", "LINES_VERSION", "TCP_AUTH", "SUPPORTED_VERSIONS", "RENDER_LINES", "RENDER_FIELDS",
    "FieldFormat", "check_format", "render_records", "MAX_FRAME_BYTES", "MAX_RECORDS_PER_BATCH", "MAX_RECORD_BYTES",
    "MAX_PATH_BYTES", "MAX_NAME_CHARS", "ProtocolError", "ClientId", "Batch", "SyncRecord",
    "StatsRequest", "Ping", "Report", "Ack", "Ok", "Error", "ERROR_CODES", "RETRYABLE_ERRORS",
    "FILE_OPTIONS", "REPORT_COUNTERS", "REPORT_STATES", "check_file_options", "options_key", "new_client_id", "default_endpoint",
    "encode_batch", "encode_sync", "encode_stats_request", "encode_ping", "encode_report",
    "encode_ack", "encode_ok", "encode_error", "decode_request", "decode_reply", "printable",
]
