"""Every handler option, declared once: name, default, which handler takes
it, how it is checked, and the line the docs table shows.

Both handlers, both factories and logging configuration files
(dictConfig/fileConfig pass keyword arguments) go through
``HandlerOptions.build``; ``docs/client.md``'s parameter table is
``markdown_table()`` (a test keeps them equal). Adding an option is one
``option(...)`` line here plus its use.
"""

import logging
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Optional, Tuple

from .. import protocol

THREAD = "NonBlockingConcurrentHandler"
ASYNC = "AsyncConcurrentHandler"
BOTH = (THREAD, ASYNC)
FALLBACK_MODES = ("drop", "block", "nowait")
# Values of ``endpoint`` / $CLH_WRITERD_ENDPOINT that mean "no daemon".
NO_DAEMON = ("none", "")


class _DefaultEndpoint:
    def __repr__(self) -> str:
        return "<default endpoint>"


# "Use the endpoint client and daemon agree on" (protocol.default_endpoint),
# as opposed to None, which means "no daemon".
DEFAULT_ENDPOINT: Any = _DefaultEndpoint()


def parse_level(value: Any) -> int:
    """A logging level from a number or a name ("ERROR", "error"), as
    ``Handler.setLevel`` takes it: an unknown name raises ValueError now,
    not at every record."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"level must be an int or a level name, not {value!r}")
    if isinstance(value, int):
        return value
    level = logging.getLevelName(value.strip().upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown level name {value!r}")
    return level


_TCP = re.compile(r"^(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.;-]+):(\*|[0-9]{1,5})$")
_SCHEMES = ("ipc", "tcp", "inproc", "ws", "wss", "tipc", "vmci", "pgm", "epgm")
# sun_path holds 108 bytes, NUL included.
_MAX_IPC_PATH = 107


def parse_endpoint(value: Any) -> Optional[str]:
    """The daemon endpoint to use, or None for no daemon.

    ``DEFAULT_ENDPOINT`` reads $CLH_WRITERD_ENDPOINT, else the endpoint the
    daemon computes the same way; ``None`` and ``"none"`` mean no daemon. A
    malformed value raises ValueError here rather than a ZMQError later.
    """
    source = "endpoint"
    if value is DEFAULT_ENDPOINT:
        if os.environ.get("CLH_WRITERD_ENDPOINT") is not None:
            source, value = "$CLH_WRITERD_ENDPOINT", os.environ["CLH_WRITERD_ENDPOINT"]
        else:
            return protocol.default_endpoint()
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{source} must be a string like 'ipc:///run/x.sock' or None, not {value!r}")
    value = value.strip()
    if value.lower() in NO_DAEMON:
        return None
    scheme, sep, address = value.partition("://")
    problem = ""
    if not sep or scheme not in _SCHEMES or not address:
        problem = f"expected <transport>://<address> with transport one of {', '.join(_SCHEMES)}"
    elif scheme == "tcp":
        match = _TCP.match(address)
        if match is None or (match.group(2) != "*" and not 0 < int(match.group(2)) < 65536):
            problem = "tcp needs host:port (port 1-65535)"
    elif scheme == "ipc" and len(os.fsencode(address)) > _MAX_IPC_PATH:
        problem = f"ipc path longer than {_MAX_IPC_PATH} bytes"
    if problem:
        raise ValueError(f"malformed {source} {value!r}: {problem}, or 'none' for no daemon")
    return value


def _positive(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a positive integer")


def _seconds(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
        raise ValueError("must be a number of seconds >= 0")


def _flag(value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError("must be True or False")


def _batch_bytes(value: Any) -> None:
    high = protocol.MAX_FRAME_BYTES // 2
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= high:
        raise ValueError(f"must be an integer in [1024, {high}]")


def _fallback_mode(value: Any) -> None:
    if value not in FALLBACK_MODES:
        raise ValueError(f"must be one of {FALLBACK_MODES}")


def _max_nowait(value: Any) -> None:
    if value is not None:
        _positive(value)


def from_env(name: str) -> Callable[[Any], Optional[str]]:
    """None (the default) -> $``name`` if set; otherwise the value as a string."""

    def convert(value: Any) -> Optional[str]:
        if value is None:
            return os.environ.get(name) or None
        if isinstance(value, bool) or not isinstance(value, (str, int, os.PathLike)):
            raise ValueError("must be a string (a name, number or path) or None")
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)

    return convert


def _tcp_auth(value: Any) -> str:
    """None (the default) -> $CLH_WRITERD_TCP_AUTH, else "curve"."""
    if value is None:
        value = os.environ.get("CLH_WRITERD_TCP_AUTH") or "curve"
    if value not in protocol.TCP_AUTH:
        raise ValueError(f"must be one of {protocol.TCP_AUTH}")
    return str(value)


def option(default: Any, doc: str, check: Optional[Callable[[Any], Any]] = None,
           handlers: Tuple[str, ...] = BOTH, convert: Optional[Callable[[Any], Any]] = None,
           per_handler: Optional[Dict[str, Any]] = None, shown: str = "") -> Any:
    """One option: its default, its docs line, which handlers take it, a
    ``check`` that raises ValueError and a ``convert`` that normalises."""
    return field(default=default, metadata={
        "doc": doc, "check": check, "handlers": handlers, "convert": convert,
        "per_handler": per_handler or {}, "shown": shown})


@dataclass(frozen=True)
class HandlerOptions:
    """The handler options (CLH's own arguments describe the file instead)."""

    endpoint: Any = option(DEFAULT_ENDPOINT, "daemon endpoint; `None` or `'none'` = no daemon (embedded writer)",
                           convert=parse_endpoint, shown="`$CLH_WRITERD_ENDPOINT` or the per-user ipc socket")
    queue_size: int = option(10000, "records the queue holds before the full-queue policy applies", _positive)
    sync_level: int = option(logging.ERROR, "records at or above it are written before `emit()` returns"
                             " (a number or a name such as `'ERROR'`)", convert=parse_level,
                             per_handler={ASYNC: logging.CRITICAL}, shown="`ERROR` (thread) / `CRITICAL` (async)")
    fallback_on_full: bool = option(True, "queue full: write synchronously (`True`) or drop and count (`False`)",
                                    _flag, handlers=(THREAD,))
    fallback_mode: str = option("drop", "queue full: `'drop'` (count), `'block'` (write on the loop),"
                                " `'nowait'` (hand to the executor, bounded)", _fallback_mode, handlers=(ASYNC,))
    executor: Any = option(None, "executor for blocking steps (default: a private thread pool)", handlers=(ASYNC,))
    block_warning: bool = option(True, "`'block'` mode: log a warning when the loop blocks (every 1000)",
                                 _flag, handlers=(ASYNC,))
    max_nowait: Optional[int] = option(None, "`'nowait'` mode: records waiting for the executor at most",
                                       _max_nowait, handlers=(ASYNC,), shown="`max(16, queue_size // 10)`")
    batch_size: int = option(1000, "records per batch sent to the daemon at most", _positive)
    batch_bytes: int = option(1024 * 1024, "bytes per batch at most (lowered to what the daemon accepts)",
                              _batch_bytes)
    linger: float = option(0.002, "seconds a partial batch waits for more records", _seconds)
    window: int = option(8, "unacknowledged batches in flight at most", _positive)
    ack_timeout: float = option(5.0, "no ack for this long: ping; no answer either: fallback", _seconds)
    liveness_timeout: float = option(2.0, "seconds a ping may take to show a silent daemon is alive", _seconds)
    sync_timeout: float = option(5.0, "seconds a sync record waits for the daemon's confirmation", _seconds)
    connect_timeout: float = option(0.5, "seconds to find a daemon before writing through the fallback", _seconds)
    max_probe_interval: float = option(5.0, "in fallback, seconds between probes for the daemon at most", _seconds)
    drain_timeout: float = option(5.0, "`stop()`/`close()`/exit: seconds to drain; then the fallback writes"
                                  " every unacknowledged record", _seconds)
    report_interval: float = option(5.0, "seconds between counter reports to the daemon (sent in every state,"
                                    " and at once after a transition)", _seconds)
    monitor_interval: float = option(0.0, "seconds between `get_stats()` summaries logged through the"
                                     " `clh_writerd.client` logger (WARNING when drops or fallback writes grew,"
                                     " else INFO); 0 = off", _seconds)
    level: int = option(logging.NOTSET, "the handler's level (a number or a name)", convert=parse_level)
    autostart: bool = option(True, "start the sender thread in the constructor", _flag, handlers=(THREAD,))
    sync_order: bool = option(True, "a sync record waits for the records queued before it (order kept); "
                              "`False`: it bypasses the queue (lower latency, may overtake them)", _flag,
                              handlers=(THREAD,))
    daemon_render: bool = option(True, "a daemon speaking protocol 2 renders the lines of a stock "
                                 "`logging.Formatter` (byte-identical); `False`: the client renders every line",
                                 _flag)
    daemon_user: Optional[str] = option(None, "ipc: the user the daemon runs as (name or uid); a socket directory it"
                                        " owns is trusted, as are this user's and root's", convert=from_env(
                                            "CLH_WRITERD_DAEMON_USER"), shown="`$CLH_WRITERD_DAEMON_USER`")
    socket_group: Optional[str] = option(None, "ipc: a group allowed to write in the socket directory (the daemon's"
                                         " `socket_group`); any other group- or world-writable directory is refused",
                                         convert=from_env("CLH_WRITERD_SOCKET_GROUP"),
                                         shown="`$CLH_WRITERD_SOCKET_GROUP`")
    curve_server_key: Optional[str] = option(None, "tcp: the daemon's public key file (`.key`, from"
                                             " `clh-writerd keygen`)", convert=from_env(
                                                 "CLH_WRITERD_CURVE_SERVER_KEY"),
                                             shown="`$CLH_WRITERD_CURVE_SERVER_KEY`")
    curve_secret_key: Optional[str] = option(None, "tcp: this client's key pair file (`.key_secret`); its public"
                                             " key must be in the daemon's `curve_public_keys_dir`",
                                             convert=from_env("CLH_WRITERD_CURVE_SECRET_KEY"),
                                             shown="`$CLH_WRITERD_CURVE_SECRET_KEY`")
    tcp_auth: str = option(None, "tcp/ws/wss/tipc endpoints: `'curve'` never sends without the daemon's CURVE key"
                           " (the fallback writes, with a warning); `'none'` sends in the clear to whoever holds the"
                           " port", convert=_tcp_auth, shown="`$CLH_WRITERD_TCP_AUTH` or `'curve'`")

    @classmethod
    def names(cls, handler: str) -> Tuple[str, ...]:
        """The option names ``handler`` (THREAD or ASYNC) takes."""
        return tuple(f.name for f in fields(cls) if handler in f.metadata["handlers"])

    @classmethod
    def build(cls, handler: str, **kwargs: Any) -> "HandlerOptions":
        """Check and normalise ``kwargs`` for ``handler``; defaults for the rest.

        Unknown names raise TypeError (as a signature would), bad values
        ValueError naming the option.
        """
        accepted = cls.names(handler)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"{handler} got unexpected keyword arguments {unknown}")
        values: Dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            if f.name in kwargs:
                value = kwargs[f.name]
            else:
                value = meta["per_handler"].get(handler, f.default)
            if handler in meta["handlers"]:
                try:
                    if meta["convert"] is not None:
                        value = meta["convert"](value)
                    if meta["check"] is not None:
                        meta["check"](value)
                except ValueError as exc:
                    raise ValueError(f"{handler}: option {f.name}={kwargs.get(f.name, value)!r}: {exc}") from None
            values[f.name] = value
        return cls(**values)


def split_kwargs(handler: str, kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(CLH's keyword arguments, the handler's own), for the factories."""
    own = HandlerOptions.names(handler)
    return ({k: v for k, v in kwargs.items() if k not in own}, {k: v for k, v in kwargs.items() if k in own})


def markdown_table() -> str:
    """docs/client.md's parameter table (tests/unit/client/test_options.py keeps it in sync)."""
    rows = ["| option | default | handlers | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(HandlerOptions):
        meta = f.metadata
        default = meta["shown"] or f"`{f.default!r}`"
        who = "both" if meta["handlers"] == BOTH else ("thread" if meta["handlers"] == (THREAD,) else "async")
        rows.append(f"| `{f.name}` | {default} | {who} | {meta['doc']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m clh_writerd.client._options [docs/client.md]: its tables
    import sys

    from .._resources import replace_block
    from ._stats import markdown_table as counters_table

    if len(sys.argv) > 1:
        replace_block(sys.argv[1], "options-table", markdown_table())
        replace_block(sys.argv[1], "counters-table", counters_table())
    else:
        print(markdown_table(), end="")
