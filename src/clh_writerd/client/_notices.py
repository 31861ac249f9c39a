"""What a handler says about itself: one warning per transition (fallback,
back to the daemon, drops) and the ``monitor_interval`` summary, through the
``clh_writerd.client`` logger.

Two rules shape ``emit``:

- Never through a handler of ours. A handler attached to the root logger
  would otherwise receive its own warnings (and, in fallback, write them
  with the very path it warns about); ``WrappingHandler.handle`` skips every
  record of this logger.
- Always somewhere. When the only handlers on the way are ours (the usual
  case: our handler on the root logger, nothing else configured), logging
  finds "a handler" and never uses ``logging.lastResort``; the notice would
  vanish. So ``emit`` hands it to ``logging.lastResort`` (stderr) itself then.
  The same when our logger is disabled: ``dictConfig`` disables every logger
  that exists before it runs unless told ``disable_existing_loggers: False``,
  ours included, and a warning about records going elsewhere or being lost
  must not vanish because of a default.

Lost records (``announce_loss``) always reach stderr, as CLH's
``handleError`` tracebacks do, and at exit a process that lost records says
so in one line (``exit_line``).
"""

import logging
import os
import sys
import traceback
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol

# A drop warning comes at the first drop, then every this many.
DROP_WARNING_EVERY = 1000

LOGGER_NAME = "clh_writerd.client"
log = logging.getLogger(LOGGER_NAME)

# Why a client entered the fallback (the kinds of docs/client.md "Warnings").
NO_DAEMON = "no daemon"
FORBIDDEN_PATH = "forbidden path"
OPTION_CONFLICT = "option conflict"
TOO_LARGE = "too large"
POLICY = "refused by policy"
STOPPING = "stopping"
WRITE_FAILED = "daemon write failed"
UNTRUSTED = "untrusted endpoint"
NOT_ANSWERING = "daemon not answering"
STOP_DEADLINE = "stop deadline"

# What to do about each kind (the warning names it).
ADVICE = {
    NO_DAEMON: "start clh-writerd (or check the endpoint and that the daemon is running)",
    FORBIDDEN_PATH: "add {dir} to allowed_dirs in the daemon's config and reload it (SIGHUP), "
                    "or log under one of its allowed_dirs",
    OPTION_CONFLICT: "give every process writing {path} the same maxBytes/backupCount/when/... "
                     "(the daemon keeps the options declared first while a process that declared them runs; "
                     "once they have all exited, as in a rolling redeploy, the next declaration wins)",
    TOO_LARGE: "raise max_message_bytes in the daemon's [limits], or lower this handler's batch_bytes",
    POLICY: "admit this process in the daemon's config (allowed_uids / peer_dirs / options), then reload it",
    WRITE_FAILED: "check the daemon's log and the file system (disk full, permissions)",
    UNTRUSTED: "fix the socket directory's owner and mode, or set daemon_user / socket_group "
               "(docs/security.md, socket directory)",
    NOT_ANSWERING: "check the daemon (stopped, overloaded, frozen?) with `clh-writerd stats`; "
                   "records it may have written already are written again (counted as resent)",
    STOP_DEADLINE: "raise drain_timeout, or find why the daemon acknowledges slowly (`clh-writerd stats`)",
    STOPPING: "nothing, if the daemon is being restarted; records are written directly until it is back",
}

KIND_OF_ERROR = {
    protocol.E_FORBIDDEN_PATH: FORBIDDEN_PATH,
    protocol.E_OPTIONS_CONFLICT: OPTION_CONFLICT,
    protocol.E_TOO_LARGE: TOO_LARGE,
    protocol.E_UNAUTHORIZED: POLICY,
    protocol.E_BAD_OPTIONS: POLICY,
    protocol.E_SHUTTING_DOWN: STOPPING,
    protocol.E_WRITE_FAILED: WRITE_FAILED,
}


def advice(kind: str, path: str) -> str:
    return ADVICE.get(kind, ADVICE[POLICY]).format(dir=os.path.dirname(path) or path, path=path)


def fallback_message(kind: str, reason: str, path: str) -> str:
    """The warning for entering the fallback."""
    return (f"clh-writerd: {path}: writing through the fallback (in this process) instead of the daemon: "
            f"{kind}: {reason}. To fix: {advice(kind, path)}.")


def drop_message(path: str, dropped: int, policy: str, kind: str) -> str:
    """The drop warning (the first drop, then every DROP_WARNING_EVERY)."""
    if "fallback_on_full" in policy:
        fix = "raise queue_size, or set fallback_on_full=True to write them synchronously instead"
    elif "nowait" in policy:
        fix = "raise queue_size or max_nowait"
    else:
        fix = "raise queue_size, or use fallback_mode='nowait' (or 'block') to write them instead"
    return (f"clh-writerd: {path}: queue full, {dropped} records dropped so far ({policy}); "
            f"the next warning comes at every {DROP_WARNING_EVERY} more. To fix: {fix}.")


def summary_line(path: str, snap: Dict[str, Any], interval: float) -> str:
    """The monitor_interval line: what get_stats() says, in one line."""
    counters = " ".join(f"{c.wire} {snap[c.name]}" for c in protocol.CLIENT_COUNTERS if c.summary)
    line = (f"clh-writerd: {path}: {snap['state']}; queue {snap['queue_depth']}/{snap['capacity']}, "
            f"in flight {snap['in_flight']}; {counters}")
    if snap.get("last_error"):
        line += f"; last error: {snap['last_error']}"
    return line


def _ours(handler: logging.Handler) -> bool:
    # A class attribute of WrappingHandler, not isinstance(): _wrapping imports this module.
    return getattr(handler, "clh_writerd_handler", False) is True


def emit(level: int, msg: str, *args: Any, logger: Optional[logging.Logger] = None, loud: bool = False) -> None:
    """Log ``msg`` on the ``clh_writerd.client`` logger; see the module
    docstring for where it goes when only our handlers are configured, or
    our logger is disabled. ``loud``: on stderr also when its level filters
    it out (records were lost)."""
    logger = logger or log
    if logger.disabled:
        _to_stderr(logger.makeRecord(logger.name, level, "(clh-writerd)", 0, msg, args, None), loud)
        return
    if not logger.isEnabledFor(level):
        if loud:
            _to_stderr(logger.makeRecord(logger.name, level, "(clh-writerd)", 0, msg, args, None), loud)
        return
    record = logger.makeRecord(logger.name, level, "(clh-writerd)", 0, msg, args, None)
    logger.handle(record)
    found = others = on_stderr = 0
    current: Optional[logging.Logger] = logger
    while current is not None:
        for handler in current.handlers:
            found += 1
            others += not _ours(handler)
            on_stderr += getattr(handler, "stream", None) is sys.stderr and level >= handler.level
        if not current.propagate:
            break
        current = current.parent  # type: ignore[assignment]
    # found == 0: logging itself used lastResort already. Loud: on stderr
    # even when it went to a file or a collector, as handleError's tracebacks do.
    if (found and not others) or (found and loud and not on_stderr):
        _to_stderr(record, loud)


def _to_stderr(record: logging.LogRecord, loud: bool) -> None:
    """Through ``logging.lastResort`` (WARNING and above, as logging does
    with no handler at all); ``loud``: whatever its level, and straight to
    stderr if an app removed lastResort."""
    last = logging.lastResort
    if last is not None and (loud or record.levelno >= last.level):
        last.handle(record)
    elif loud:
        try:
            sys.stderr.write(record.getMessage() + "\n")
        except Exception:
            pass


# Loss causes, by what the error says, and what to do about them.
_LOSS_ADVICE: Tuple[Tuple[str, str], ...] = (
    ("LockTimeout", "find the process holding {lock} (`fuser {lock}`) and stop it"),
    ("Permission", "let this process's user write {dir} and the log and lock files in it (the group the "
                   "daemon's files get: docs/operations.md, permissions)"),
    ("FileNotFound", "create {dir}, or let this process create it"),
    ("NotADirectory", "a file stands where {dir} or one of its parents should be a directory: move it"),
    ("No space", "free space on the file system of {dir}"),
)


def loss_advice(cause: str, path: str) -> str:
    directory = os.path.dirname(path) or path
    lock = os.path.join(directory, ".__" + os.path.basename(path).rsplit(".log", 1)[0] + ".lock")
    for key, text in _LOSS_ADVICE:
        if key in cause:
            return text.format(dir=directory, lock=lock)
    return "check the file system and the daemon (`clh-writerd stats`)"


def announce_loss(path: str, count: int, total: int, cause: str, error: Optional[BaseException] = None) -> None:
    """Records could not be written anywhere: say so on stderr (loud), with
    the traceback of ``error`` the first time, as CLH's handleError would
    (only while ``logging.raiseExceptions``, as there)."""
    emit(logging.ERROR, "clh-writerd: %s: %d records could not be written (neither the daemon nor the fallback "
         "took them): %s; %d lost so far in process %d. To fix: %s.", path, count, cause, total, os.getpid(),
         loss_advice(cause, path), loud=True)
    if error is not None and logging.raiseExceptions:
        try:
            sys.stderr.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        except Exception:
            pass


def exit_line(losses: List[Tuple[str, int, int, str]]) -> str:
    """The one line a process that lost or dropped records prints at exit:
    ``losses`` holds (path, lost, dropped, cause) per handler."""
    parts = []
    for path, lost, dropped, cause in losses:
        what = []
        if lost:
            what.append(f"{lost} lost ({cause or 'see above'})")
        if dropped:
            what.append(f"{dropped} dropped by policy (queue full)")
        parts.append(f"{path}: {', '.join(what)}")
    return f"clh-writerd: process {os.getpid()} exits with records not written: {'; '.join(parts)}"
