"""The daemon's config keys, each declared once in ``OPTIONS``: section, key,
default, the check that turns a TOML value into the ``Config`` attribute, the
docs table's line, the reference config's comment block and whether a reload
applies it.

``config.py`` reads the table: the loader, ``check-config``'s printout, the
docs table of docs/operations.md and the reference config
daemon/clh-writerd.toml (``python -m clh_writerd.daemon.config``).
"""

import grp
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

from .. import protocol
from .._sockdir import group_id, user_id

FSYNC_POLICIES = ("never", "batch", "interval")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message naming the key."""


# What a value of each kind is called in error messages ("must be an integer ...").
_KIND_NAMES = {int: "an integer", float: "a number"}


def _positive(kind: type, low: Any, high: Any) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if type(value) is int and kind is float:
            value = float(value)
        if type(value) is not kind or not (low <= value <= high):
            raise ConfigError(f"{key} must be {_KIND_NAMES[kind]} in [{low}, {high}], got {value!r}")
        return value

    return check


def _choice(choices: Tuple[str, ...]) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _string(key: str, value: Any) -> str:
    if type(value) is not str:
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _boolean(key: str, value: Any) -> bool:
    if type(value) is not bool:
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _dirs(key: str, value: Any) -> Tuple[str, ...]:
    if type(value) is not list or not value or not all(type(v) is str and v for v in value):
        raise ConfigError(f"{key} must be a non-empty list of directory paths")
    return tuple(os.path.realpath(os.path.abspath(v)) for v in value)


def _listen(key: str, value: Any) -> str:
    value = _string(key, value)
    if value:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{key} must be HOST:PORT, got {value!r}")
    return value


def _globs(key: str, value: Any) -> Tuple[str, ...]:
    if type(value) is not list or not all(type(v) is str and v for v in value):
        raise ConfigError(f"{key} must be a list of file paths or glob patterns")
    return tuple(os.path.abspath(v) for v in value)


def _hostname(key: str, value: Any) -> str:
    value = _string(key, value)
    # RFC 5424 HOSTNAME: 1-255 printable US-ASCII characters, no space.
    if len(value) > 255 or not all(33 <= ord(c) < 127 for c in value):
        raise ConfigError(f"{key} must be printable ASCII without spaces (at most 255), got {value!r}")
    return value


def _group(key: str, value: Any) -> str:
    value = _string(key, value)
    if value and not value.isdigit():
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ConfigError(f"{key}: no such group {value!r}") from None
    return value


def _principals(kind: str) -> Callable[[str, Any], Tuple[int, ...]]:
    """A list of user (or group) names and numbers -> their ids (resolved once, at load)."""
    lookup = user_id if kind == "user" else group_id

    def check(key: str, value: Any) -> Tuple[int, ...]:
        if type(value) is not list or not all(type(v) in (str, int) and v != "" for v in value):
            raise ConfigError(f"{key} must be a list of {kind} names or numbers")
        out = []
        for v in value:
            try:
                out.append(lookup(v))
            except KeyError:
                raise ConfigError(f"{key}: no such {kind} {v!r}") from None
        return tuple(sorted(set(i for i in out if i is not None)))

    return check


def _peer_dirs(key: str, value: Any) -> Dict[str, Tuple[str, ...]]:
    """{"user" or uid or "@group" or "@gid": [dirs]} -> {"<uid>" or "@<gid>": (real dirs)}."""
    if not isinstance(value, dict):
        raise ConfigError(f'{key} must be a table like {{ app = ["/var/log/app"], "@ops" = ["/var/log/ops"] }}')
    out: Dict[str, Tuple[str, ...]] = {}
    for who, dirs in value.items():
        group = who.startswith("@")
        try:
            number = (group_id if group else user_id)(who[1:] if group else who)
        except KeyError:
            raise ConfigError(f"{key}: no such {'group' if group else 'user'} {who!r}") from None
        if number is None:
            raise ConfigError(f"{key}: empty name")
        out[f"@{number}" if group else str(number)] = _dirs(f"{key}.{who}", dirs)
    return out


def _admins(key: str, value: Any) -> Tuple[str, ...]:
    """["user", uid, "@group", "key:<Z85 public key>"] -> ("<uid>", "@<gid>", "key:...") (resolved at load)."""
    if type(value) is not list or not all(type(v) in (str, int) and v != "" for v in value):
        raise ConfigError(f'{key} must be a list of users, "@group"s or "key:<CURVE public key>"s')
    out = []
    for v in value:
        text = str(v)
        if text.startswith("key:"):
            if len(text) != 44:
                raise ConfigError(f"{key}: {text!r} is not key: and a 40-character CURVE public key (Z85)")
            out.append(text)
            continue
        group = text.startswith("@")
        try:
            number = (group_id if group else user_id)(text[1:] if group else v)
        except KeyError:
            raise ConfigError(f"{key}: no such {'group' if group else 'user'} {text!r}") from None
        out.append(f"@{number}" if group else str(number))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class Option:
    """One key of the config file: where it lives, its default, the check that
    turns a TOML value into the Config attribute, the docs table's line and
    the reference config's comment block."""

    section: str
    key: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    # The reference config's comment block above the key (dedented; "" =
    # SAME_BLOCK: the block above also explains this key).
    notes: str
    # A reload (SIGHUP) keeps the running value: it is read once, at start.
    restart_only: bool = False


# An Option's notes when the reference config explains the key in the block of
# the key above it (socket_group with socket_dir_mode, ...).
SAME_BLOCK = ""

# In the order of the reference config; keys that share a comment block are adjacent.
OPTIONS: Tuple[Option, ...] = (
    Option("daemon", "endpoint", "", _string,
           'ZeroMQ endpoint to bind: "ipc:///path/to.sock" or "tcp://127.0.0.1:PORT". '
           'Empty: $CLH_WRITERD_ENDPOINT, else an ipc socket in the per-user runtime directory.', restart_only=True,
           notes="""
        ZeroMQ endpoint the daemon binds (one ROUTER socket).
          "ipc:///run/clh-writerd/writerd.sock"  a unix socket (the default kind)
          "tcp://127.0.0.1:5599"                 tcp, loopback only unless allow_remote_tcp
        Abstract unix sockets ("ipc://@name") are refused: anyone may bind the name.
        Empty: $CLH_WRITERD_ENDPOINT if set, else ipc://$XDG_RUNTIME_DIR/clh-writerd/writerd.sock,
        else ipc:///tmp/clh-writerd-<uid>/writerd.sock. Clients compute the same default.
        A unix socket path may be at most 107 bytes long.
        """),
    Option("daemon", "socket_dir_mode", 0o700, _positive(int, 0, 0o7777),
           "Mode of the directory that holds the ipc socket (who may connect).", restart_only=True,
           notes="""
        Mode and group of the directory holding the ipc socket. 0o700 = this user
        only; 0o750 with socket_group = "clh-writers" lets members of that group
        reach the socket (it is made 0660). Nobody but the daemon may write in it:
        a mode that lets the group or others write is refused (a member could swap
        the socket for her own). The daemon creates the directory, and
        refuses to start if it exists but belongs to another user (not root) or
        others may write in it: they could move the socket aside and listen in its
        place. Clients apply the same check before they connect (docs/security.md).
        """),
    Option("daemon", "socket_group", "", _group,
           'Group of the socket directory (name or gid); "" leaves it as created.', restart_only=True,
           notes=SAME_BLOCK),
    Option("daemon", "allowed_uids", [], _principals("user"),
           "Users (names or uids) whose processes may use an ipc endpoint, besides the daemon's own uid and root "
           "(the kernel's peer credentials decide, not what a client claims).",
           notes="""
        Who may use an ipc endpoint, by the peer credentials the kernel hands over
        (uid, gid, pid of the connecting process: never what a client claims).
        The daemon's own uid and root always may. Names or numbers; a group admits
        its members (primary or supplementary group in the user database).
        Everyone else gets "unauthorized" for every message (stats and ping too).
        """),
    Option("daemon", "allowed_groups", [], _principals("group"),
           "Groups (names or gids) whose members may use an ipc endpoint (primary or supplementary, "
           "as the user database says).",
           notes=SAME_BLOCK),
    Option("daemon", "peer_dirs", {}, _peer_dirs,
           'Per user or "@group": the only directories (within allowed_dirs) its processes may write under; '
           "a peer matching no entry may write under every allowed dir.",
           notes="""
        Per user or "@group": the only directories (within allowed_dirs) its
        processes may write under, e.g.
          peer_dirs = { app1 = ["/var/log/app/app1"], "@ops" = ["/var/log/app/ops"] }
        A peer matching no entry may write under every allowed dir.
        """),
    Option("daemon", "stats_admins", [], _admins,
           'Who sees every client and file in stats and /metrics: users, "@group"s, and on tcp "key:<public key>"s '
           "(root and the daemon's own uid always do); any other peer sees its own clients and the files they write.",
           notes="""
        Who sees every client and file in `clh-writerd stats` and /metrics: users,
        "@group"s, and on tcp "key:<CURVE public key>"s. Root and the daemon's own
        user always do. Any other peer sees the daemon-wide counters and only its
        own clients and the files they write (paths and program names are not
        everyone's business).
        """),
    Option("daemon", "metrics_public", False, _boolean,
           "Show per-file and per-client series on /metrics to every scraper (off: only to loopback scrapers that "
           "run as a stats admin; the others get the daemon-wide series).", restart_only=True,
           notes="""
        /metrics shows per-file and per-client series only to loopback scrapers
        running as a stats admin (the daemon asks the kernel who owns the scraping
        connection); every other scraper gets the daemon-wide series. true shows
        everything to anyone who can reach metrics_listen (a remote Prometheus).
        """),
    Option("daemon", "allow_remote_tcp", False, _boolean,
           "Allow a tcp endpoint on a non-loopback address.", restart_only=True,
           notes="""
        Allow a tcp endpoint on an address that is not loopback.
        """),
    Option("daemon", "tcp_auth", "curve", _choice(protocol.TCP_AUTH),
           'tcp endpoints: "curve" (clients need a key in curve_public_keys_dir) or "none" (anyone who can '
           "reach the port may write; warned at every start).", restart_only=True,
           notes="""
        tcp endpoints are authenticated with CURVE: the daemon's key pair and a
        directory of the client public keys it admits (`clh-writerd keygen` makes
        both; the directory is re-read on SIGHUP). Checked as ssh checks keys: the
        secret key and the directory must be this user's or root's, writable by
        nobody else, the secret key readable by nobody else. "none" accepts anyone who can
        reach the port (warned at every start; only behind other protection).
        """),
    Option("daemon", "curve_secret_key", "", _string,
           "The daemon's CURVE key pair (the .key_secret file of `clh-writerd keygen`), for tcp.", restart_only=True,
           notes=SAME_BLOCK),
    Option("daemon", "curve_public_keys_dir", "", _string,
           "Directory of the client public keys (.key files) admitted on tcp; re-read on reload.",
           notes=SAME_BLOCK),
    Option("daemon", "allowed_dirs", ["logs"], _dirs,
           "The only directories (real paths, subdirectories included) the daemon writes under.",
           notes="""
        The only directories the daemon writes under (real paths; subdirectories
        included and created on demand). Anything else - relative paths, '..',
        NUL bytes, symlinks leading out, directories - is refused with
        "forbidden_path" and counted in stats; the client falls back to writing
        the file itself. A relative entry (the default "logs") is resolved once, at
        start or reload, against the daemon's working directory (not the config
        file's): the start line prints each resolved directory as an absolute path.
        """),
    Option("daemon", "create_allowed_dirs", True, _boolean,
           "Create missing allowed directories at start.",
           notes="""
        Create missing allowed directories at start.
        """),
    Option("daemon", "allow_owner", False, _boolean,
           "Honour a client's owner=(user, group) option (chown); refused otherwise.",
           notes="""
        Honour a client's owner=(user, group) option, i.e. chown files as the
        client asks. Off by default: a client could otherwise give files away.
        """),
    Option("daemon", "drain_timeout", 10.0, _positive(float, 0.1, 3600.0),
           "Seconds SIGTERM/SIGINT may spend writing and acknowledging what was received.",
           notes="""
        On SIGTERM/SIGINT the daemon stops reading, writes and acknowledges
        everything it received, and exits 0 - or exits 1 after this many seconds.
        """),
    Option("daemon", "log_level", "info", _choice(LOG_LEVELS),
           "Level of the daemon's own diagnostics on stderr.",
           notes="""
        The daemon's own diagnostics on stderr: debug, info, warning or error.
        """),
    Option("daemon", "log_rate_limit", 100, _positive(int, 0, 1_000_000),
           "Diagnostic lines per second at most (bursts of as many); the rest are counted and summarised "
           "once a second. 0 = no limit.",
           notes="""
        At most this many diagnostic lines per second (a burst of as many is let
        through); the lines beyond are counted and one line a second says how many
        were suppressed, so a client that provokes a warning per message cannot
        flood the journal. Control characters from clients are always escaped.
        0 = no limit.
        """),
    Option("daemon", "metrics_listen", "", _listen,
           'Prometheus metrics at http://HOST:PORT/metrics (needs clh-writerd[metrics]); "" = off.', restart_only=True,
           notes="""
        Prometheus metrics: the figures of `clh-writerd stats` at
        http://HOST:PORT/metrics. Needs the extra: pip install 'clh-writerd[metrics]'.
        Bind it to loopback unless your scraper runs elsewhere. "" = off.
        """),
    Option("daemon", "metrics_per_client", False, _boolean,
           "Also expose one series per client process (pid, session labels): one new series per worker "
           "restart; off = client series per (program, file) only.", restart_only=True,
           notes="""
        Also expose one series per client process (labels host, pid, program,
        session, file: clh_writerd_process_*). Off, client series are per program
        and file only, so worker restarts add no series. Needs a restart.
        """),
    Option("daemon", "clients_gone_after", 300.0, _positive(float, 1.0, 30 * 86400.0),
           "Seconds after which a client not seen (or closed) leaves the stats client list; its reported totals "
           'are kept in "clients_gone", per program and file.',
           notes="""
        Seconds after which a client not seen (a closed one too) leaves the client
        list of `clh-writerd stats`; its reported totals (dropped, fallback, resent,
        ...) are kept in "clients_gone", summed per program and file.
        """),
    Option("limits", "max_message_bytes", 8 * 1024 * 1024, _positive(int, 1024, protocol.MAX_FRAME_BYTES),
           "Largest frame accepted; larger ones up to twice this are answered too_large, beyond that libzmq disconnects.",
           notes="""
        Largest frame accepted (bytes). A larger frame, up to twice this size, is
        answered "too_large" and counted; beyond that ZeroMQ (ZMQ_MAXMSGSIZE) drops
        the sender's connection. Clients learn this limit when they connect and
        split batches to fit; a record too large for it goes through their fallback.
        """),
    Option("limits", "queue_batches", 256, _positive(int, 1, 1_000_000),
           "Batches queued per file before the daemon answers 'busy' (backpressure).",
           notes="""
        Batches queued per file before the daemon answers "busy": backpressure,
        after which the client's policy (retry, fallback, drop) applies.
        """),
    Option("limits", "max_write_chars", 256 * 1024, _positive(int, 1024, 64 * 1024 * 1024),
           "Largest chunk written between two rollover checks.",
           notes="""
        Largest chunk (characters) written between two rollover checks; a batch
        larger than this is written in several chunks under the same lock.
        """),
    Option("limits", "max_files", 1000, _positive(int, 1, 100_000),
           "Files served at once (lowered at start to what RLIMIT_NOFILE allows: 4 descriptors per file, "
           "half of the limit for files); an idle file is closed when its slot is needed.",
           notes="""
        Files served at once, and client entries kept in stats. At start the
        daemon raises its descriptor limit (RLIMIT_NOFILE) from soft to hard and
        lowers max_files to what it allows (4 descriptors per file, half of the
        limit kept for connections); `clh-writerd stats --json` shows the
        effective figures under daemon.limits. When every slot is taken the least
        recently used idle file is closed; if none is idle the batch is answered
        "busy" and the client falls back.
        """),
    Option("limits", "max_clients", 10000, _positive(int, 1, 1_000_000),
           "Client entries kept in stats (least recently seen are forgotten).",
           notes=SAME_BLOCK),
    Option("limits", "max_connections", 4096, _positive(int, 8, 1_000_000),
           "Connections held at once (each costs libzmq about 30 KiB); lowered at start to the descriptors "
           "left after the files' share and a reserve. One beyond is shut down at once and counted.",
           notes="""
        Connections held at once (one per client handler, one more for its sync
        records). Each costs libzmq about 30 KiB of memory, so this bounds what a
        flood of connections can take; it is lowered at start to the descriptors
        left after the files' share and a reserve (daemon.limits.connections).
        A connection beyond it is shut down at once (connections_refused).
        """),
    Option("limits", "idle_file_seconds", 300.0, _positive(float, 0.0, 86400.0),
           "Close a file (descriptors, lock, thread) after this many seconds without a batch; 0 = never.",
           notes="""
        Close a file - its descriptors, CLH lock and writer thread - after this
        many seconds without a batch (0 = never). It is reopened on the next one.
        """),
    Option("limits", "max_path_depth", 16, _positive(int, 1, 256),
           "Path components allowed below an allowed directory, the file name included.",
           notes="""
        Path components allowed below an allowed directory, the file name
        included; deeper paths are refused "forbidden_path" (docs/security.md).
        """),
    Option("limits", "receive_buffer_bytes", 64 * 1024 * 1024, _positive(int, 64 * 1024, 1 << 40),
           "Bytes libzmq may buffer per connection before it stops reading it: RCVHWM is this over the "
           "largest frame (2 x max_message_bytes), at least 1. Read at start (a reload keeps it).", restart_only=True,
           notes="""
        Byte budgets: what any one client can make the daemon hold in memory
        (docs/security.md, "Budgets", says how to size them). Beyond a queue
        budget a batch is answered "busy" (the client retries, then falls back);
        nothing grows.

        libzmq buffers at most receive_buffer_bytes per connection while the main
        loop is busy: its RCVHWM is this over the largest frame it accepts
        (2 x max_message_bytes), at least 1 frame.
        """),
    Option("limits", "queue_bytes", 64 * 1024 * 1024, _positive(int, 64 * 1024, 1 << 40),
           "Bytes queued per file (characters of the lines plus 64 per record) before the daemon answers 'busy'.",
           notes="""
        Lines waiting to be written (their characters plus 64 bytes per record):
        per file, per peer (a uid on ipc, a CURVE key on tcp) over all files, and
        in total.
        """),
    Option("limits", "peer_queue_bytes", 128 * 1024 * 1024, _positive(int, 64 * 1024, 1 << 40),
           "Bytes one peer (a uid on ipc, a CURVE key on tcp) may have queued over all files; beyond: 'busy'.",
           notes=SAME_BLOCK),
    Option("limits", "total_queue_bytes", 512 * 1024 * 1024, _positive(int, 64 * 1024, 1 << 40),
           "Bytes queued over all files and peers; beyond: 'busy'.",
           notes=SAME_BLOCK),
    Option("limits", "peer_max_files", 250, _positive(int, 1, 100_000),
           "Files one peer may hold open at once (at most max_files): its least recently used idle one is "
           "closed for a new one; if none is idle, 'busy' for that peer only.",
           notes="""
        Files one peer may hold open at once (lowered to the effective max_files):
        a peer that stalls its own files makes only itself "busy".
        """),
    Option("limits", "unread_reply_bytes", 64 * 1024, _positive(int, 4096, 1 << 30),
           "A connection with more than this many reply bytes unread in its socket gets no reply larger than "
           "512 bytes (dropped and counted in replies_dropped): a peer that does not read loses its replies.",
           notes="""
        A connection that has more than this many bytes of replies unread in its
        socket gets no reply larger than 512 bytes (stats, errors): they are
        dropped and counted (replies_dropped). A peer that does not read loses its
        replies, not the daemon's memory.
        """),
    Option("limits", "stats_max_bytes", 1024 * 1024, _positive(int, 16 * 1024, protocol.MAX_FRAME_BYTES),
           "Largest stats reply: beyond it the document lists the clients in trouble and the most recent first, "
           "and totals for the rest ('truncated'); a /metrics scrape stays about this size too.",
           notes="""
        Largest stats reply. A larger document keeps the clients in trouble and
        the most recently seen ones (files likewise) and sums the rest under
        "truncated"; a /metrics scrape is built from a document of the same budget.
        """),
    Option("limits", "handshake_timeout", 5.0, _positive(float, 0.1, 600.0),
           "Seconds a connection may take to complete its handshake (CURVE on tcp); connections still "
           "handshaking are the first shut down when connections are short.",
           notes="""
        Seconds a new connection may take to finish its handshake (the CURVE
        handshake on tcp); when connections are short, those still handshaking
        are shut down first, so a flood of silent tcp connections cannot keep an
        authenticated client out.
        """),
    Option("fsync", "policy", "never", _choice(FSYNC_POLICIES),
           'Default fsync policy: "never", "batch" (after every write) or "interval".',
           notes="""
        When the daemon calls fsync on a file:
          "never"    leave it to the OS (the written data is in the page cache)
          "batch"    after every write, before acknowledging it
          "interval" at most every `interval` seconds while data is unsynced
        """),
    Option("fsync", "interval", 1.0, _positive(float, 0.001, 3600.0),
           'Seconds between fsyncs under the "interval" policy.',
           notes=SAME_BLOCK),
    Option("forward", "target", "", _listen,
           'Central RELP server as HOST:PORT (rsyslog imrelp); "" = no forwarding.', restart_only=True,
           notes="""
        HOST:PORT of rsyslog's imrelp, e.g.
          target = "central.example.net:2514"
        """),
    Option("forward", "paths", [], _globs,
           "Files to forward (paths or glob patterns of the live files; rotated segments follow).", restart_only=True,
           notes="""
        Live files; their .N / .N.gz segments follow, e.g.
          paths = ["/var/log/myapp/*.log"]
        """),
    Option("forward", "state_file", "forward-checkpoint.json", _string,
           "Checkpoint of acknowledged offsets per segment (written atomically).", restart_only=True,
           notes="""
        Acked offset per segment, written atomically.
        """),
    Option("forward", "hostname", "", _hostname,
           'HOSTNAME field of forwarded records; "" = this machine\'s hostname.', restart_only=True,
           notes="""
        "" = this machine's hostname.
        """),
    Option("forward", "window", 256, _positive(int, 1, 100_000),
           "RELP frames sent and not yet acknowledged, at most (also the duplicate bound per reconnect).", restart_only=True,
           notes="""
        Frames in flight; duplicates per reconnect <= window.
        """),
    Option("forward", "checkpoint_interval", 0.2, _positive(float, 0.0, 60.0),
           "Seconds between checkpoint writes while acks arrive (bounds resends after a forwarder crash).", restart_only=True,
           notes="""
        Seconds between checkpoint writes.
        """),
    Option("forward", "timeout", 5.0, _positive(float, 0.1, 600.0),
           "Seconds without any ack while frames are in flight before the session is dropped and resent.", restart_only=True,
           notes="""
        No ack for this long with frames in flight: reconnect, resend.
        """),
    Option("forward", "hold_max_bytes", 1024 ** 3, _positive(int, 0, 2 ** 60),
           "Disk budget for a long outage: rotated segments not yet forwarded are kept (hard links) up to "
           "this many bytes after retention deletes them; beyond it they are counted as lost. 0 = off.", restart_only=True,
           notes="""
        Disk budget: unforwarded rotated segments kept after retention.
        """),
    Option("forward", "hold_dir", "", _string,
           'Where held segments are linked (same filesystem as the logs); "" = `<state_file>.hold`.', restart_only=True,
           notes="""
        "" = "<state_file>.hold" (must be on the logs' filesystem).
        """),
    Option("forward", "tls", False, _boolean,
           "RELP over TLS (imrelp tls=\"on\" with x509 certificates).", restart_only=True,
           notes="""
        RELP over TLS (x509): the CA bundle that signed the server's certificate
        ("" = system CAs) and, for mutual TLS, this host's certificate and its key
        ("" = none).
        """),
    Option("forward", "tls_ca_file", "", _string, 'CA bundle that signed the server certificate ("" = system CAs).',
           restart_only=True, notes=SAME_BLOCK),
    Option("forward", "tls_cert_file", "", _string, 'Client certificate (PEM) for mutual TLS ("" = none).',
           restart_only=True, notes=SAME_BLOCK),
    Option("forward", "tls_key_file", "", _string, "Key of tls_cert_file.", restart_only=True, notes=SAME_BLOCK),
)
