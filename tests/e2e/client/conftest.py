"""Fixtures of the client tests."""

import logging
import os
from typing import Any, Iterator, List, Optional

import pytest

from clh_writerd import NonBlockingConcurrentHandler, create_nonblocking_handler


@pytest.fixture
def make_handler() -> Iterator[Any]:
    """make_handler(path, endpoint, **kwargs) -> a started handler with a
    "%(message)s" formatter; every handler is closed after the test."""
    made: List[NonBlockingConcurrentHandler] = []

    def make(path: str, endpoint: Optional[str], fmt: str = "%(message)s", **kwargs: Any):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kwargs.setdefault("connect_timeout", 5.0)
        handler = create_nonblocking_handler(path, endpoint=endpoint, **kwargs)
        handler.setFormatter(logging.Formatter(fmt))
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.close()
