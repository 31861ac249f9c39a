"""The client's states and the counters behind ``get_stats()``."""

from dataclasses import dataclass, fields
from typing import Any, Dict, Tuple

from .. import protocol

STATE_CONNECTING = "connecting"
STATE_DAEMON = "daemon"
STATE_FALLBACK = "fallback"
STATE_EMBEDDED = "embedded"  # no daemon: the in-process writer is the only path
STATE_STOPPED = "stopped"

# The largest record a client sends to a daemon it knows nothing about: half
# the protocol's record limit, so one record plus the batch around it always
# fits a frame. A daemon with a smaller max_message_bytes lowers it.
RECORD_LIMIT = protocol.MAX_RECORD_BYTES // 2


@dataclass
class ClientStats:
    """Counters shared by the thread and asyncio handlers (same keys). Each
    counter is declared, with what it counts and where it is shown, in
    ``protocol.CLIENT_COUNTERS``; here it is a typed attribute (a test keeps
    the two equal)."""

    enqueued: int = 0
    sent: int = 0
    acked: int = 0
    fallback_written: int = 0
    dropped_count: int = 0
    resent: int = 0
    fallback_count: int = 0
    sync_count: int = 0
    sync_timeouts: int = 0
    busy: int = 0
    write_errors: int = 0
    lost: int = 0
    oversize: int = 0
    unencodable: int = 0
    closed_count: int = 0
    # Not counters:
    state: str = STATE_CONNECTING
    last_error: str = ""
    loss_cause: str = ""  # why the last records were lost (the exit line says it)
    # The largest record (UTF-8 bytes) sent to the daemon, lowered by its
    # max_message_bytes (ping reply); batch and sync paths both read it.
    record_limit: int = RECORD_LIMIT

    def report(self) -> Dict[str, int]:
        """The counters a client reports to the daemon about itself, by their wire names."""
        return {wire: getattr(self, name) for name, wire in _REPORTED}

    def lose(self, count: int, cause: str) -> None:
        """``count`` records could not be written anywhere, because of ``cause``."""
        self.lost += count
        self.loss_cause = cause

    def count(self, counter: str) -> None:
        """One more for the counter named ``counter`` (a field of this class)."""
        setattr(self, counter, getattr(self, counter) + 1)

    def snapshot(self, queue_depth: int, capacity: int, in_flight: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        out.update(queue_depth=queue_depth, capacity=capacity, in_flight=in_flight,
                   state=self.state, last_error=self.last_error)
        return out


COUNTERS: Tuple[str, ...] = tuple(c.name for c in protocol.CLIENT_COUNTERS)
_REPORTED: Tuple[Tuple[str, str], ...] = tuple((c.name, c.wire) for c in protocol.CLIENT_COUNTERS if c.wire)
# The dataclass's int attributes are the declared counters (record_limit aside).
assert COUNTERS == tuple(f.name for f in fields(ClientStats) if f.type in (int, "int") and f.name != "record_limit")

def markdown_table() -> str:
    """docs/client.md's get_stats() counters (``python -m clh_writerd.client._options docs/client.md``)."""
    rows = [f"| `{c.name}` | {f'`{c.wire}`' if c.wire else '-'} | {c.help} |" for c in protocol.CLIENT_COUNTERS]
    return "| counter | reported to the daemon as | meaning |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"
