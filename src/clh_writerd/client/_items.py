"""How a LogRecord becomes what travels (an ``Item``), in two halves both
handlers share: ``prepare``/``freeze`` on the caller's thread (freeze the
message; for queued records, the values the daemon renders, not the
LogRecord) and ``finish`` on the sender (the packed values for the daemon,
or the line the wrapped CLH handler's formatter renders).

"Render" means one thing in this package: making a line's text (the
wrapped formatter, or ``FieldFormat.render`` from field values, on either
side). ``ItemMaker`` renders only when the daemon will not.
"""

import logging
from typing import Any, Optional, Tuple


from .._batchwrite import CLHHandler
from ._stats import RECORD_LIMIT
from ._plans import PLANS, FieldPlan, Item, to_line


class ItemMaker:
    """Turns LogRecords into the lines written to the file, or, with
    ``fields`` on, into the values a daemon renders them from.

    ``fields`` is fixed for the handler's life (``daemon_render`` and a
    daemon endpoint), never switched per connection: callers' threads read it
    on every record. Values meet a daemon that does not render them (an old
    one, or none: the fallback) at the encoding, which renders them there
    (``to_line``): the same text, by the same format.
    """

    def __init__(self, handler: CLHHandler, fields: bool = False) -> None:
        self.handler = handler
        self.fields = fields
        self._plan: Tuple[Any, Optional[FieldPlan]] = (None, None)  # (formatter, its plan)

    def prepare(self, record: logging.LogRecord) -> Tuple[logging.LogRecord, str]:
        """Caller's thread: freeze what may change later, nothing more.

        The message is merged with its arguments now (they may be mutated after
        the call) and an exception is rendered now (tracebacks do not travel);
        the rest of formatting happens on the sender.
        """
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter().formatException(record.exc_info)
        return record, record.getMessage()

    def freeze(self, record: logging.LogRecord) -> Any:
        """Caller's thread, for queued records: ``prepare``, and with
        ``fields`` on, a tuple of the record's values instead:
        ``(plan number, message, created, msecs, *own values)``.

        The LogRecord is then freed at once: records waiting in a queue of
        thousands would otherwise survive into the GC's oldest generation and
        make the app's full collections run (6 per 200,000 records in a
        flood, each one over the whole heap of the app). The tuple is flat
        on purpose: the collector untracks a tuple of plain values the first
        time it sees one, but a tuple holding another tuple only if it sees
        the inner one first, and for a queued item it sees the outer one
        first; nested, the queued items went on into the oldest generation.
        """
        d = record.__dict__
        if d.get("exc_info") or d.get("exc_text") or d.get("stack_info"):
            return self.prepare(record)
        message = record.getMessage()
        if self.fields:
            known, plan = self._plan  # the hot path: _current_plan() inlined
            if known is not (self.handler.formatter or logging._defaultFormatter):  # type: ignore[attr-defined]
                plan = self._current_plan()
            if plan is not None and type(d.get("created")) is float:
                own = plan.own_values(d)
                if own is not None:
                    return (plan.number, message, d["created"], d.get("msecs"), *own)
        return record, message

    def _current_plan(self) -> Optional[FieldPlan]:
        formatter = self.handler.formatter or logging._defaultFormatter  # type: ignore[attr-defined]
        known, plan = self._plan
        if known is not formatter:
            plan = FieldPlan.for_formatter(formatter, self.handler)
            self._plan = (formatter, plan)
        return plan

    def finish(self, item: Any, limit: int = RECORD_LIMIT) -> Item:
        """Sender: the field values for the daemon, when it renders this
        formatter's lines (and the line is sure to stay within ``limit``
        bytes, the daemon's record limit); else the line the wrapped
        handler's formatter renders from a frozen copy."""
        if type(item[0]) is int:  # frozen by freeze()
            frozen_plan = PLANS[item[0]]
            if self.fields:
                flight = frozen_plan.flight(item, limit)
                if flight is not None:
                    return flight
            return self.handler.format(frozen_plan.record(item[4:], item[1], item[2], item[3]))
        record, message = item
        if self.fields:
            plan = self._current_plan()
            if plan is not None:
                flight = plan.flight_of(record, message, limit)
                if flight is not None:
                    return flight
        # A copy whose message is frozen. exc_info stays: a custom formatter
        # may read it (a JSON one, say); the stock one uses the exc_text
        # prepare() made, as it would have made it itself.
        frozen = logging.LogRecord.__new__(logging.LogRecord)
        frozen.__dict__.update(record.__dict__)
        frozen.msg, frozen.args = message, None
        return self.handler.format(frozen)

    def line(self, item: Tuple[logging.LogRecord, str]) -> str:
        """Always a line (rendered here)."""
        return to_line(self.finish(item))

    def finish_now(self, record: logging.LogRecord, limit: int = RECORD_LIMIT) -> Item:
        """Both halves at once, for records written before emit() returns."""
        return self.finish(self.prepare(record), limit)

    def _formatter(self) -> logging.Formatter:
        return self.handler.formatter or logging.Formatter()

