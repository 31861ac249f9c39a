"""The daemon's configuration: plain, validated data with one loader.

Every option is declared once, in ``OPTIONS`` (daemon/options.py). The TOML
loader, ``check-config``'s printout, the guides' tables of keys and the
reference config (daemon/clh-writerd.toml) all come from that table: after
adding or changing a key, ``make generated`` (``python -m
clh_writerd.daemon.config docs/operations.md docs/forwarding.md
daemon/clh-writerd.toml``) rewrites the last two.
Relative paths are resolved against the daemon's working directory.
"""

import fnmatch
import ipaddress
import os
import sys
import textwrap
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .. import protocol
from .options import OPTIONS, SAME_BLOCK, ConfigError, Option

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the test matrix on older Pythons
    import tomli as tomllib

EMBEDDED = "<embedded default>"


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
            lines.append(f"{opt.key} = {_toml_text(opt, getattr(self, _attr(opt)))}")
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


def _toml_text(opt: Option, value: Any) -> str:
    """A value of ``opt`` as TOML, modes in octal (0o700) as one writes them."""
    return oct(value) if opt.key.endswith("_mode") else _toml_value(value)


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


_FSYNC = {opt.key: opt for opt in OPTIONS if opt.section == "fsync"}


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
        pattern = entry.get("path")
        if type(pattern) is not str:
            raise ConfigError(f"{where}.path must be a string, got {pattern!r}")
        if not os.path.isabs(pattern):
            pattern = os.path.abspath(pattern)
        # An override is checked as the [fsync] key it overrides (one declaration).
        policy = _FSYNC["policy"].check(f"{where}.fsync", entry.get("fsync", defaults["fsync_policy"]))
        interval = _FSYNC["interval"].check(f"{where}.fsync_interval",
                                            entry.get("fsync_interval", defaults["fsync_interval"]))
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
    text = f"`{_toml_text(opt, opt.default)}`"
    if opt.key.endswith("_bytes") and isinstance(opt.default, int) and opt.default >= 1024:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if opt.default % size == 0:
                return f"{text} ({opt.default // size} {unit})"
    return text


def markdown_table(section: Optional[str] = None) -> str:
    """docs/operations.md's table of every key, or with ``section`` the table
    of one section's keys (docs/forwarding.md's of ``[forward]``);
    tests/unit/daemon/test_config.py keeps both in sync."""
    rows = ["| key | default | on reload | meaning |", "| --- | --- | --- | --- |"]
    for opt in OPTIONS:
        if section is not None and opt.section != section:
            continue
        key = f"`{opt.key}`" if section else f"`[{opt.section}]` `{opt.key}`"
        reload = "restart" if opt.restart_only else "live"
        rows.append(f"| {key} | {_shown(opt)} | {reload} | {opt.doc.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


# The generated tables of the guides: block name -> the section it shows (None: every key).
DOC_TABLES = {"config-table": None, "forward-table": "forward"}


# The reference config's comments that belong to no key (each key's block is
# its Option.notes): the file's opening, what stands above a section, and
# what follows one (the [[files]] tables override [fsync]).
_REFERENCE_HEADER = """
    clh-writerd reference configuration.

    Every key the daemon knows is listed here with its default value and what it
    does (the file is generated from the table the daemon reads its keys from).
    Validate a copy with:   clh-writerd check-config /etc/clh-writerd/clh-writerd.toml
    Relative paths are resolved against the daemon's working directory.
    Unknown sections or keys are an error (a typo never silently falls back).
    """
_REFERENCE_BEFORE = {"forward": """
    At-least-once forwarding to a central rsyslog over RELP (docs/forwarding.md).
    Off unless `target` is set. The central must run the configuration that
    `clh-writerd forward-config rsyslog` prints (Direct queue: part of the guarantee).
    """}
_REFERENCE_AFTER = {"fsync": """
    Per-file overrides: the first [[files]] entry whose fnmatch pattern matches a
    file's absolute path wins. Keys: path (pattern), fsync, fsync_interval.
    [[files]]
    path = "/var/log/myapp/audit*.log"
    fsync = "batch"

    [[files]]
    path = "/var/log/myapp/*.log"
    fsync = "interval"
    fsync_interval = 0.5
    """}


def _comment(text: str) -> List[str]:
    """An indented block of prose as TOML comment lines ("#" alone for an empty line)."""
    return [f"# {line}".rstrip() for line in textwrap.dedent(text).strip("\n").splitlines()]


def reference_toml() -> str:
    """The reference config (daemon/clh-writerd.toml): per section, every key's
    notes and its default; a key whose notes are SAME_BLOCK follows the key above
    without a blank line (tests/unit/daemon/test_config.py keeps the file in sync)."""
    lines = _comment(_REFERENCE_HEADER)
    for section in dict.fromkeys(opt.section for opt in OPTIONS):
        lines += ["", *_comment(_REFERENCE_BEFORE.get(section, "")), f"[{section}]"]
        for i, opt in enumerate(o for o in OPTIONS if o.section == section):
            if i and opt.notes != SAME_BLOCK:
                lines.append("")
            lines += _comment(opt.notes)
            lines.append(f"{opt.key} = {_toml_text(opt, opt.default)}")
        if section in _REFERENCE_AFTER:
            lines += ["", *_comment(_REFERENCE_AFTER[section])]
    return "\n".join(lines) + "\n"


__all__ = ["Config", "ConfigError", "FileOverride", "OPTIONS", "load_config", "config_from_mapping"]


if __name__ == "__main__":  # python -m clh_writerd.daemon.config [docs/operations.md] [daemon/clh-writerd.toml]
    from .._resources import replace_block

    # A .toml path is the reference config (rewritten whole); any other file
    # has tables of keys between the markers of DOC_TABLES' blocks.
    for path in sys.argv[1:]:
        if path.endswith(".toml"):
            with open(path, "w", encoding="utf-8") as f:
                f.write(reference_toml())
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for name, section in DOC_TABLES.items():
            if f"<!-- {name}:start -->" in text:
                replace_block(path, name, markdown_table(section))
    if len(sys.argv) == 1:
        print(markdown_table(), end="")
