"""The daemon's configuration: plain, validated data with one loader.

Every option is declared once, in ``OPTIONS``: its section, key, default and
check. The TOML loader, ``check-config``'s printout and the reference config
test all read that table. Relative paths are resolved against the daemon's
working directory.
"""

import fnmatch
import grp
import ipaddress
import os
import sys
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .. import protocol
from .._sockdir import group_id, user_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the test matrix on older Pythons
    import tomli as tomllib

EMBEDDED = "<embedded default>"
FSYNC_POLICIES = ("never", "batch", "interval")
LOG_LEVELS = ("debug", "info", "warning", "error")
TCP_AUTH = ("curve", "none")


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
    section: str
    key: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    # A reload (SIGHUP) keeps the running value: it is read once, at start.
    restart_only: bool = False


OPTIONS: Tuple[Option, ...] = (
    Option("daemon", "endpoint", "", _string,
           'ZeroMQ endpoint to bind: "ipc:///path/to.sock" or "tcp://127.0.0.1:PORT". '
           'Empty: $CLH_WRITERD_ENDPOINT, else an ipc socket in the per-user runtime directory.', restart_only=True),
    Option("daemon", "socket_dir_mode", 0o700, _positive(int, 0, 0o7777),
           "Mode of the directory that holds the ipc socket (who may connect).", restart_only=True),
    Option("daemon", "socket_group", "", _group,
           'Group of the socket directory (name or gid); "" leaves it as created.', restart_only=True),
    Option("daemon", "allow_remote_tcp", False, _boolean,
           "Allow a tcp endpoint on a non-loopback address.", restart_only=True),
    Option("daemon", "allowed_dirs", ["logs"], _dirs,
           "The only directories (real paths, subdirectories included) the daemon writes under."),
    Option("daemon", "allowed_uids", [], _principals("user"),
           "Users (names or uids) whose processes may use an ipc endpoint, besides the daemon's own uid and root "
           "(the kernel's peer credentials decide, not what a client claims)."),
    Option("daemon", "allowed_groups", [], _principals("group"),
           "Groups (names or gids) whose members may use an ipc endpoint (primary or supplementary, "
           "as the user database says)."),
    Option("daemon", "peer_dirs", {}, _peer_dirs,
           'Per user or "@group": the only directories (within allowed_dirs) its processes may write under; '
           "a peer matching no entry may write under every allowed dir."),
    Option("daemon", "stats_admins", [], _admins,
           'Who sees every client and file in stats and /metrics: users, "@group"s, and on tcp "key:<public key>"s '
           "(root and the daemon's own uid always do); any other peer sees its own clients and the files they write."),
    Option("daemon", "metrics_public", False, _boolean,
           "Show per-file and per-client series on /metrics to every scraper (off: only to loopback scrapers that "
           "run as a stats admin; the others get the daemon-wide series).", restart_only=True),
    Option("daemon", "tcp_auth", "curve", _choice(TCP_AUTH),
           'tcp endpoints: "curve" (clients need a key in curve_public_keys_dir) or "none" (anyone who can '
           "reach the port may write; warned at every start).", restart_only=True),
    Option("daemon", "curve_secret_key", "", _string,
           "The daemon's CURVE key pair (the .key_secret file of `clh-writerd keygen`), for tcp.", restart_only=True),
    Option("daemon", "curve_public_keys_dir", "", _string,
           "Directory of the client public keys (.key files) admitted on tcp; re-read on reload."),
    Option("daemon", "create_allowed_dirs", True, _boolean,
           "Create missing allowed directories at start."),
    Option("daemon", "allow_owner", False, _boolean,
           "Honour a client's owner=(user, group) option (chown); refused otherwise."),
    Option("daemon", "drain_timeout", 10.0, _positive(float, 0.1, 3600.0),
           "Seconds SIGTERM/SIGINT may spend writing and acknowledging what was received."),
    Option("daemon", "log_level", "info", _choice(LOG_LEVELS),
           "Level of the daemon's own diagnostics on stderr."),
    Option("daemon", "log_rate_limit", 100, _positive(int, 0, 1_000_000),
           "Diagnostic lines per second at most (bursts of as many); the rest are counted and summarised "
           "once a second. 0 = no limit."),
    Option("daemon", "metrics_listen", "", _listen,
           'Prometheus metrics at http://HOST:PORT/metrics (needs clh-writerd[metrics]); "" = off.', restart_only=True),
    Option("daemon", "metrics_per_client", False, _boolean,
           "Also expose one series per client process (pid, session labels): one new series per worker "
           "restart; off = client series per (program, file) only.", restart_only=True),
    Option("daemon", "clients_gone_after", 300.0, _positive(float, 1.0, 30 * 86400.0),
           "Seconds after which a client not seen (or closed) leaves the stats client list; its reported totals "
           'are kept in "clients_gone", per program and file.'),
    Option("limits", "max_message_bytes", 8 * 1024 * 1024, _positive(int, 1024, protocol.MAX_FRAME_BYTES),
           "Largest frame accepted; larger ones up to twice this are answered too_large, beyond that libzmq disconnects."),
    Option("limits", "queue_batches", 256, _positive(int, 1, 1_000_000),
           "Batches queued per file before the daemon answers 'busy' (backpressure)."),
    Option("limits", "max_write_chars", 256 * 1024, _positive(int, 1024, 64 * 1024 * 1024),
           "Largest chunk written between two rollover checks."),
    Option("limits", "max_files", 1000, _positive(int, 1, 100_000),
           "Files served at once (lowered at start to what RLIMIT_NOFILE allows: 4 descriptors per file, "
           "half of the limit for files); an idle file is closed when its slot is needed."),
    Option("limits", "idle_file_seconds", 300.0, _positive(float, 0.0, 86400.0),
           "Close a file (descriptors, lock, thread) after this many seconds without a batch; 0 = never."),
    Option("limits", "max_path_depth", 16, _positive(int, 1, 256),
           "Path components allowed below an allowed directory, the file name included."),
    Option("limits", "max_connections", 4096, _positive(int, 8, 1_000_000),
           "Connections held at once (each costs libzmq about 30 KiB); lowered at start to the descriptors "
           "left after the files' share and a reserve. One beyond is shut down at once and counted."),
    Option("limits", "max_clients", 10000, _positive(int, 1, 1_000_000),
           "Client entries kept in stats (least recently seen are forgotten)."),
    # Byte budgets (docs/security.md, "Budgets"): what one client can make the daemon hold.
    Option("limits", "receive_buffer_bytes", 64 * 1024 * 1024, _positive(int, 64 * 1024, 1 << 40),
           "Bytes libzmq may buffer per connection before it stops reading it: RCVHWM is this over the "
           "largest frame (2 x max_message_bytes), at least 1. Read at start (a reload keeps it).", restart_only=True),
    Option("limits", "queue_bytes", 64 * 1024 * 1024, _positive(int, 64 * 1024, 1 << 40),
           "Bytes queued per file (characters of the lines plus 64 per record) before the daemon answers 'busy'."),
    Option("limits", "peer_queue_bytes", 128 * 1024 * 1024, _positive(int, 64 * 1024, 1 << 40),
           "Bytes one peer (a uid on ipc, a CURVE key on tcp) may have queued over all files; beyond: 'busy'."),
    Option("limits", "total_queue_bytes", 512 * 1024 * 1024, _positive(int, 64 * 1024, 1 << 40),
           "Bytes queued over all files and peers; beyond: 'busy'."),
    Option("limits", "peer_max_files", 250, _positive(int, 1, 100_000),
           "Files one peer may hold open at once (at most max_files): its least recently used idle one is "
           "closed for a new one; if none is idle, 'busy' for that peer only."),
    Option("limits", "unread_reply_bytes", 64 * 1024, _positive(int, 4096, 1 << 30),
           "A connection with more than this many reply bytes unread in its socket gets no reply larger than "
           "512 bytes (dropped and counted in replies_dropped): a peer that does not read loses its replies."),
    Option("limits", "stats_max_bytes", 1024 * 1024, _positive(int, 16 * 1024, protocol.MAX_FRAME_BYTES),
           "Largest stats reply: beyond it the document lists the clients in trouble and the most recent first, "
           "and totals for the rest ('truncated'); a /metrics scrape stays about this size too."),
    Option("limits", "handshake_timeout", 5.0, _positive(float, 0.1, 600.0),
           "Seconds a connection may take to complete its handshake (CURVE on tcp); connections still "
           "handshaking are the first shut down when connections are short."),
    Option("fsync", "policy", "never", _choice(FSYNC_POLICIES),
           'Default fsync policy: "never", "batch" (after every write) or "interval".'),
    Option("fsync", "interval", 1.0, _positive(float, 0.001, 3600.0),
           'Seconds between fsyncs under the "interval" policy.'),
    # [forward]: at-least-once forwarding to a central rsyslog over RELP (docs/forwarding.md).
    Option("forward", "target", "", _listen,
           'Central RELP server as HOST:PORT (rsyslog imrelp); "" = no forwarding.', restart_only=True),
    Option("forward", "paths", [], _globs,
           "Files to forward (paths or glob patterns of the live files; rotated segments follow).", restart_only=True),
    Option("forward", "state_file", "forward-checkpoint.json", _string,
           "Checkpoint of acknowledged offsets per segment (written atomically).", restart_only=True),
    Option("forward", "hostname", "", _hostname,
           'HOSTNAME field of forwarded records; "" = this machine\'s hostname.', restart_only=True),
    Option("forward", "window", 256, _positive(int, 1, 100_000),
           "RELP frames sent and not yet acknowledged, at most (also the duplicate bound per reconnect).", restart_only=True),
    Option("forward", "checkpoint_interval", 0.2, _positive(float, 0.0, 60.0),
           "Seconds between checkpoint writes while acks arrive (bounds resends after a forwarder crash).", restart_only=True),
    Option("forward", "timeout", 5.0, _positive(float, 0.1, 600.0),
           "Seconds without any ack while frames are in flight before the session is dropped and resent.", restart_only=True),
    Option("forward", "hold_max_bytes", 1024 ** 3, _positive(int, 0, 2 ** 60),
           "Disk budget for a long outage: rotated segments not yet forwarded are kept (hard links) up to "
           "this many bytes after retention deletes them; beyond it they are counted as lost. 0 = off.", restart_only=True),
    Option("forward", "hold_dir", "", _string,
           'Where held segments are linked (same filesystem as the logs); "" = "<state_file>.hold".', restart_only=True),
    Option("forward", "tls", False, _boolean,
           "RELP over TLS (imrelp tls=\"on\" with x509 certificates).", restart_only=True),
    Option("forward", "tls_ca_file", "", _string, 'CA bundle that signed the server certificate ("" = system CAs).', restart_only=True),
    Option("forward", "tls_cert_file", "", _string, 'Client certificate (PEM) for mutual TLS ("" = none).', restart_only=True),
    Option("forward", "tls_key_file", "", _string, "Key of tls_cert_file.", restart_only=True),
)


@dataclass(frozen=True)
class FileOverride:
    """Per-file settings, matched by an fnmatch pattern on the absolute path."""

    pattern: str
    fsync: str
    fsync_interval: float


@dataclass(frozen=True)
class Config:
    """One typed attribute per ``OPTIONS`` entry (``[fsync]`` and ``[forward]``
    keys prefixed with their section; no defaults here: they are the table's,
    and the module checks at import that the two name the same keys), then
    what the loader derives."""

    endpoint: str
    socket_dir_mode: int
    socket_group: str
    allow_remote_tcp: bool
    allowed_dirs: Tuple[str, ...]
    allowed_uids: Tuple[int, ...]
    allowed_groups: Tuple[int, ...]
    peer_dirs: Dict[str, Tuple[str, ...]]
    stats_admins: Tuple[str, ...]
    metrics_public: bool
    tcp_auth: str
    curve_secret_key: str
    curve_public_keys_dir: str
    create_allowed_dirs: bool
    allow_owner: bool
    drain_timeout: float
    log_level: str
    log_rate_limit: int
    metrics_listen: str
    metrics_per_client: bool
    clients_gone_after: float
    max_message_bytes: int
    queue_batches: int
    max_write_chars: int
    max_files: int
    idle_file_seconds: float
    max_path_depth: int
    max_connections: int
    max_clients: int
    receive_buffer_bytes: int
    queue_bytes: int
    peer_queue_bytes: int
    total_queue_bytes: int
    peer_max_files: int
    unread_reply_bytes: int
    stats_max_bytes: int
    handshake_timeout: float
    fsync_policy: str
    fsync_interval: float
    forward_target: str
    forward_paths: Tuple[str, ...]
    forward_state_file: str
    forward_hostname: str
    forward_window: int
    forward_checkpoint_interval: float
    forward_timeout: float
    forward_hold_max_bytes: int
    forward_hold_dir: str
    forward_tls: bool
    forward_tls_ca_file: str
    forward_tls_cert_file: str
    forward_tls_key_file: str
    # Derived by the loader, not keys of the file:
    files: Tuple[FileOverride, ...]  # the [[files]] tables
    source: str  # the file read, or EMBEDDED
    # allowed_dirs as written (absolute, not resolved): a client's path may
    # start with these names too (docs/security.md, "How paths are reached").
    allowed_dir_names: Tuple[str, ...]

    def fsync_for(self, path: str) -> Tuple[str, float]:
        """The fsync policy and interval for one file (first matching override wins)."""
        for override in self.files:
            if fnmatch.fnmatchcase(path, override.pattern):
                return override.fsync, override.fsync_interval
        return self.fsync_policy, self.fsync_interval

    @property
    def ipc_path(self) -> Optional[str]:
        return self.endpoint[len("ipc://"):] if self.endpoint.startswith("ipc://") else None

    def as_toml(self) -> str:
        """The effective configuration, as TOML that load_config reads back."""
        lines = [f"# effective configuration (from {self.source})"]
        section = None
        for opt in OPTIONS:
            if opt.section != section:
                section = opt.section
                lines.append(f"\n[{section}]")
            value = getattr(self, _attr(opt))
            text = oct(value) if opt.key.endswith("_mode") else _toml_value(value)
            lines.append(f"{opt.key} = {text}")
        for override in self.files:
            lines.append("\n[[files]]")
            lines.append(f"path = {_toml_value(override.pattern)}")
            lines.append(f"fsync = {_toml_value(override.fsync)}")
            lines.append(f"fsync_interval = {_toml_value(override.fsync_interval)}")
        return "\n".join(lines) + "\n"


def _attr(opt: Option) -> str:
    return f"{opt.section}_{opt.key}" if opt.section in ("fsync", "forward") else opt.key


DERIVED = ("files", "source", "allowed_dir_names")
_declared = [_attr(opt) for opt in OPTIONS] + list(DERIVED)
if sorted(f.name for f in fields(Config)) != sorted(_declared):  # pragma: no cover - a declaration error
    raise TypeError("Config's fields and OPTIONS differ: "
                    f"{sorted(set(f.name for f in fields(Config)) ^ set(_declared))}")

# The Config attributes a reload keeps (Option.restart_only).
RESTART_ONLY: Tuple[str, ...] = tuple(_attr(opt) for opt in OPTIONS if opt.restart_only)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _check_endpoint(config: Config) -> Config:
    endpoint = config.endpoint or protocol.default_endpoint()
    if endpoint.startswith("ipc://@"):
        raise ConfigError(f"endpoint: abstract ipc endpoints ({endpoint}) are refused: any local process can bind "
                          "the name, and no directory rule protects it; use a socket path")
    if endpoint.startswith("ipc://"):
        path = os.path.abspath(endpoint[len("ipc://"):])
        # Linux's sun_path holds 108 bytes including the terminating NUL.
        if len(os.fsencode(path)) > 107:
            raise ConfigError(f"endpoint: ipc path {path!r} is longer than the 107-byte limit of a unix socket")
        return replace(config, endpoint="ipc://" + path)
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        if not config.allow_remote_tcp:
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ConfigError(
                    f"endpoint: {endpoint} is not a loopback address; set allow_remote_tcp = true to bind it"
                )
        if config.tcp_auth == "curve" and not (config.curve_secret_key and config.curve_public_keys_dir):
            raise ConfigError(
                f"endpoint: {endpoint} needs CURVE keys: set curve_secret_key and curve_public_keys_dir "
                '(clh-writerd keygen), or tcp_auth = "none" to accept unauthenticated tcp')
        return replace(config, endpoint=endpoint)
    raise ConfigError(f"endpoint must start with ipc:// or tcp://, got {endpoint!r}")


def _files(value: Any, defaults: Mapping[str, Any]) -> Tuple[FileOverride, ...]:
    if type(value) is not list:
        raise ConfigError("[[files]] must be an array of tables")
    out: List[FileOverride] = []
    for i, entry in enumerate(value):
        where = f"files[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table ([[files]]), got {entry!r}")
        unknown = set(entry) - {"path", "fsync", "fsync_interval"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        pattern = _string(f"{where}.path", entry.get("path"))
        if not os.path.isabs(pattern):
            pattern = os.path.abspath(pattern)
        policy = _choice(FSYNC_POLICIES)(f"{where}.fsync", entry.get("fsync", defaults["fsync_policy"]))
        interval = _positive(float, 0.001, 3600.0)(
            f"{where}.fsync_interval", entry.get("fsync_interval", defaults["fsync_interval"])
        )
        out.append(FileOverride(pattern, policy, interval))
    return tuple(out)


def config_from_mapping(data: Mapping[str, Any], source: str = EMBEDDED) -> Config:
    """Validate a parsed TOML document (or {} for the embedded default)."""
    known_sections = {opt.section for opt in OPTIONS} | {"files"}
    unknown = set(data) - known_sections
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; known: {sorted(known_sections)}")
    values: Dict[str, Any] = {}
    for section in known_sections - {"files"}:
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        keys = {opt.key for opt in OPTIONS if opt.section == section}
        extra = set(table) - keys
        if extra:
            raise ConfigError(f"[{section}]: unknown key(s) {sorted(extra)}; known: {sorted(keys)}")
    for opt in OPTIONS:
        raw = data.get(opt.section, {}).get(opt.key, opt.default)
        values[_attr(opt)] = opt.check(f"{opt.section}.{opt.key}", raw)
    values["files"] = _files(data.get("files", []), values)
    values["allowed_dir_names"] = tuple(os.path.abspath(d) for d in data.get("daemon", {}).get(
        "allowed_dirs", next(o.default for o in OPTIONS if o.key == "allowed_dirs")))
    if values["forward_target"] and not values["forward_paths"]:
        raise ConfigError("forward.target is set but forward.paths is empty: nothing to forward")
    values["forward_state_file"] = os.path.abspath(values["forward_state_file"])
    for who, dirs in values["peer_dirs"].items():
        for d in dirs:
            if not any(d == a or d.startswith(a.rstrip(os.sep) + os.sep) for a in values["allowed_dirs"]):
                raise ConfigError(f"daemon.peer_dirs: {d} (for {who}) is not within allowed_dirs")
    for key in ("curve_secret_key", "curve_public_keys_dir"):
        if values[key]:
            values[key] = os.path.abspath(values[key])
    if values["socket_dir_mode"] & 0o002:
        raise ConfigError("daemon.socket_dir_mode must not let others write in the socket directory "
                          f"(got {oct(values['socket_dir_mode'])})")
    if values["socket_dir_mode"] & 0o020:
        raise ConfigError(f"daemon.socket_dir_mode {oct(values['socket_dir_mode'])} lets the group write in the "
                          "socket directory: a member could move the socket aside and listen in the daemon's place; "
                          "the group may connect with 0o750 and socket_group")
    return _check_endpoint(Config(source=source, **values))


def metrics_warnings(config: Config) -> List[str]:
    """What the daemon says at start about its metrics endpoint (and check-config too)."""
    if not config.metrics_listen:
        return []
    host = config.metrics_listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return []
    shown = ("every file path and program name to anyone who can reach it (metrics_public = true)"
             if config.metrics_public else "the daemon-wide series to anyone who can reach it")
    return [f"metrics_listen = {config.metrics_listen!r} is not a loopback address: /metrics shows {shown}; "
            "bind it to 127.0.0.1 unless a firewall guards the port"]


def config_warnings(config: Config) -> List[str]:
    """What is valid but will not do what the file seems to ask (check-config
    prints these on stderr; the exit status stays 0)."""
    out: List[str] = metrics_warnings(config)
    if config.metrics_listen:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            out.append(f"metrics_listen = {config.metrics_listen!r} needs prometheus-client, which is not "
                       "installed for this Python: pip install 'clh-writerd[metrics]'")
    return out


def load_config(path: Optional[str] = None) -> Config:
    """Load and validate a TOML config file; ``None`` gives the embedded default."""
    if path is None:
        return config_from_mapping({})
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return config_from_mapping(data, source=os.path.abspath(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _shown(opt: Option) -> str:
    """A default as the docs table shows it: TOML, modes in octal, byte counts also in KiB/MiB/GiB."""
    if opt.key.endswith("_mode"):
        return f"`{oct(opt.default)}`"
    text = f"`{_toml_value(opt.default)}`"
    if opt.key.endswith("_bytes") and isinstance(opt.default, int) and opt.default >= 1024:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if opt.default % size == 0:
                return f"{text} ({opt.default // size} {unit})"
    return text


def markdown_table() -> str:
    """docs/operations.md's table of every key (tests/unit/daemon/test_config.py keeps it in sync)."""
    rows = ["| key | default | on reload | meaning |", "| --- | --- | --- | --- |"]
    for opt in OPTIONS:
        reload = "restart" if opt.restart_only else "live"
        rows.append(f"| `[{opt.section}]` `{opt.key}` | {_shown(opt)} | {reload} | {opt.doc.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


__all__ = ["Config", "ConfigError", "FileOverride", "OPTIONS", "load_config", "config_from_mapping"]


if __name__ == "__main__":  # python -m clh_writerd.daemon.config [docs/operations.md]: its table of keys
    from .._resources import replace_block

    if len(sys.argv) > 1:
        replace_block(sys.argv[1], "config-table", markdown_table())
    else:
        print(markdown_table(), end="")
