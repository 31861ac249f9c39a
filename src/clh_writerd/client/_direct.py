"""Writes that do not go through the batch window: the fallback (the wrapped
CLH handler, in this process) and the confirmed write of one sync record."""

import threading
from typing import Any, Optional, Sequence

from .._batchwrite import BatchWriter, CLHHandler
from ._stages import Item, cannot_travel, to_lines
from ._stats import STATE_FALLBACK, ClientStats


class Fallback:
    """Direct writes through the wrapped CLH handler (same file, same lock,
    same rotation) with the batch-write seam the daemon uses. Thread-safe:
    CLH's own thread lock serialises the sender and callers' sync writes."""

    def __init__(self, handler: CLHHandler, stats: ClientStats) -> None:
        self.writer = BatchWriter(handler)
        self.stats = stats
        self._lock = threading.Lock()

    def write(self, lines: Sequence[Item]) -> bool:
        """Write lines (field values are rendered here first); on error count
        it, keep last_error and return False."""
        if not lines:
            return True
        try:
            self.writer.write(to_lines(lines))
        except Exception as exc:
            with self._lock:
                self.stats.write_errors += 1
                self.stats.last_error = f"fallback write failed: {type(exc).__name__}: {exc}"
            return False
        with self._lock:
            self.stats.fallback_written += len(lines)
        return True


class Confirmed:
    """Writes one line and returns only once it is in the file: through the
    daemon (a SyncChannel) when it is reachable, else through the fallback."""

    def __init__(self, sync: Optional[Any], fallback: Fallback, stats: ClientStats) -> None:
        self.sync = sync
        self.fallback = fallback
        self.stats = stats

    def write(self, line: Item) -> None:
        """Raises OSError when even the fallback could not write the line."""
        if self.sync is not None and self.stats.state != STATE_FALLBACK:
            reason = cannot_travel(line, self.stats.record_limit)
            if reason:
                # Too large: the daemon would refuse it, or libzmq cut the REQ off
                # (a sync_timeout). Not UTF-8: msgpack refuses it.
                self.stats.count(reason)
            elif self.sync.write(line):
                return
        if not self.fallback.write([line]):
            raise OSError(self.stats.last_error)
