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
    """Counters shared by the thread and asyncio handlers (same keys)."""

    enqueued: int = 0  # accepted into the queue
    sent: int = 0  # records sent to the daemon (resends included)
    acked: int = 0  # records the daemon acknowledged as written
    dropped_count: int = 0  # refused by policy (queue full, drop)
    fallback_count: int = 0  # queue full (or stopping): handled synchronously instead
    fallback_written: int = 0  # records written directly through CLH
    sync_count: int = 0  # records at or above sync_level written before emit returned
    sync_timeouts: int = 0  # sync records the daemon did not confirm in time
    resent: int = 0  # records sent but not acked, then sent again or written by the fallback
    busy: int = 0  # batches refused by the daemon's backpressure
    write_errors: int = 0  # fallback writes that raised (attempts, not records)
    lost: int = 0  # records that could not be written anywhere (the daemon and the fallback failed)
    oversize: int = 0  # records too large for one frame: written by the fallback
    unencodable: int = 0  # records whose text is not UTF-8 (lone surrogates): written by the fallback
    closed_count: int = 0  # records emitted after close(): written through the fallback
    # Not counters:
    state: str = STATE_CONNECTING
    last_error: str = ""
    loss_cause: str = ""  # why the last records were lost (the exit line says it)
    # The largest record (UTF-8 bytes) sent to the daemon, lowered by its
    # max_message_bytes (ping reply); batch and sync paths both read it.
    record_limit: int = RECORD_LIMIT

    def report(self) -> Dict[str, int]:
        """The counters a client reports to the daemon about itself."""
        return {
            "dropped": self.dropped_count,
            "fallback": self.fallback_written,
            "resent": self.resent,
            "queue_full": self.fallback_count,
            "sync_timeouts": self.sync_timeouts,
            "oversize": self.oversize,
            "unencodable": self.unencodable,
            "sent": self.sent,
            "acked": self.acked,
            "write_errors": self.write_errors,
            "lost": self.lost,
        }

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


COUNTERS: Tuple[str, ...] = tuple(f.name for f in fields(ClientStats) if f.type in (int, "int")
                                  and f.name != "record_limit")
