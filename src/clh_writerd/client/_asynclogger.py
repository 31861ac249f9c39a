"""AsyncLogger: ``await alog.critical(...)`` returns once the record is written.

It builds the record the way ``Logger._log`` does (caller's file, line and
function from the frame that awaited it), hands it to the handler's
``emit_wait`` and to the logger's other handlers as usual.
"""

import logging
import sys
import traceback
from typing import Any, Dict, List, Optional


class AsyncLogger:
    """``await alog.critical("payment %s captured", pid)`` returns once the
    record is in the file. Other handlers of the logger get it as usual."""

    def __init__(self, logger: logging.Logger, handler: Any) -> None:
        self.logger = logger
        self.handler = handler

    async def log(self, level: int, msg: Any, *args: Any, exc_info: Any = None, stack_info: bool = False,
                  extra: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> None:
        await self._log(level, msg, args, exc_info, stack_info, extra, timeout)

    async def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.DEBUG, msg, args, **kwargs)

    async def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.INFO, msg, args, **kwargs)

    async def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.WARNING, msg, args, **kwargs)

    async def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.ERROR, msg, args, **kwargs)

    async def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        await self._log(logging.ERROR, msg, args, **kwargs)

    async def critical(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.CRITICAL, msg, args, **kwargs)

    async def _log(self, level: int, msg: Any, args: Any, exc_info: Any = None, stack_info: bool = False,
                   extra: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> None:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        # The caller is two frames up (the level method, then its caller).
        frame = sys._getframe(2)
        code = frame.f_code
        if exc_info and not isinstance(exc_info, tuple):
            exc_info = sys.exc_info() if not isinstance(exc_info, BaseException) else \
                (type(exc_info), exc_info, exc_info.__traceback__)
        sinfo = None
        if stack_info:
            sinfo = "Stack (most recent call last):\n" + "".join(traceback.format_stack(frame)).rstrip("\n")
        record = logger.makeRecord(logger.name, level, code.co_filename, frame.f_lineno, msg, args,
                                   exc_info, code.co_name, extra, sinfo)
        if not logger.filter(record):
            return
        if self.handler.filter(record) and level >= self.handler.level:
            await self.handler.emit_wait(record, timeout)
        for other in _handlers_of(logger):
            if other is not self.handler and level >= other.level:
                other.handle(record)


def _handlers_of(logger: logging.Logger) -> List[logging.Handler]:
    """The handlers Logger.callHandlers would reach, in order."""
    out: List[logging.Handler] = []
    current: Optional[logging.Logger] = logger
    while current is not None:
        out.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent  # type: ignore[assignment]
    return out
