"""A drop-in for concurrent-log-handler's ``setup_logging_queues()``.

CLH 0.9.28 removed ``concurrent_log_handler.queue.setup_logging_queues()``,
which moved every handler of every configured logger behind an unbounded
queue. Code that called it changes one import::

    from clh_writerd.migrate import setup_logging_queues   # was: concurrent_log_handler.queue

This version is narrower and bounded: it wraps only concurrent-log-handler's
own handlers, each in a ``NonBlockingConcurrentHandler`` that keeps the CLH
handler's formatter, level and filters. docs/migration.md says what it does
and does not do.
"""

import logging
from typing import Any, Dict, Iterable, List, Optional, Union, cast

from concurrent_log_handler import ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler

from .client.nonblocking import NonBlockingConcurrentHandler

# Exact types only: a subclass may override emit() or format(), which a
# daemon-side write would silently skip. Wrap such a handler yourself.
CLH_HANDLER_TYPES = (ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler)
CLHHandler = Union[ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler]


def configured_loggers() -> List[logging.Logger]:
    """The root logger and every logger created so far (placeholders skipped)."""
    loggers: List[logging.Logger] = [logging.getLogger()]
    # A copy: another thread may create a logger while we iterate.
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            loggers.append(logger)
    return loggers


def wrap_clh_handler(handler: CLHHandler, **options: Any) -> NonBlockingConcurrentHandler:
    """A NonBlockingConcurrentHandler around ``handler`` with its formatter, level and filters.

    ``options`` are NonBlockingConcurrentHandler's keyword arguments
    (``endpoint``, ``queue_size``, ``sync_level``, ...).
    """
    wrapper = NonBlockingConcurrentHandler(handler, level=handler.level, **options)
    if handler.formatter is not None:
        wrapper.setFormatter(handler.formatter)
    for record_filter in handler.filters:
        wrapper.addFilter(record_filter)
    return wrapper


def setup_logging_queues(loggers: Optional[Iterable[logging.Logger]] = None,
                         **options: Any) -> List[NonBlockingConcurrentHandler]:
    """Wrap every concurrent-log-handler handler attached to a logger right now.

    Each ``ConcurrentRotatingFileHandler`` or ``ConcurrentTimedRotatingFileHandler``
    found on ``loggers`` (default: the root logger and every logger created so
    far) is replaced, at the same place in the logger's handler list, by a
    ``NonBlockingConcurrentHandler`` wrapping it with the same formatter, level
    and filters. A handler shared by several loggers gets one wrapper, shared
    the same way. Other handlers (console, subclasses of CLH's handlers,
    handlers already wrapped) are left alone, so calling it twice changes
    nothing the second time. ``options`` go to every wrapper
    (``endpoint=None`` for no daemon, ``queue_size``, ``sync_level``, ...).

    Returns the wrappers it created; ``close()`` on one drains it (logging's
    own shutdown at interpreter exit does that too).
    """
    wrappers: Dict[int, NonBlockingConcurrentHandler] = {}
    for logger in configured_loggers() if loggers is None else loggers:
        current = list(logger.handlers)
        if not any(type(h) in CLH_HANDLER_TYPES for h in current):
            continue
        replaced = []
        for handler in current:
            if type(handler) in CLH_HANDLER_TYPES:
                if id(handler) not in wrappers:
                    wrappers[id(handler)] = wrap_clh_handler(cast(CLHHandler, handler), **options)
                handler = wrappers[id(handler)]
            replaced.append(handler)
        # One assignment: a thread logging meanwhile sees the old list or the new one.
        logger.handlers = replaced
    return list(wrappers.values())


__all__ = ["setup_logging_queues", "wrap_clh_handler", "configured_loggers", "CLH_HANDLER_TYPES"]
