"""The rule between the two houses, and the fixtures both use.

tests/unit mirrors src/ one file per module and runs without a daemon or a
process; tests/e2e holds everything else, marked e2e by its own conftest. A
test in tests/unit that asks for a process-starting fixture or carries the e2e
mark is refused at collection.
"""

import logging
import os
from typing import Any, Iterator, List, Optional

import pytest

from clh_writerd import NonBlockingConcurrentHandler, create_nonblocking_handler

# Fixtures that start real processes (tests/e2e and its subdirectories define them).
PROCESS_FIXTURES = {"start_daemon", "daemon", "raw_client", "image", "crowd", "central", "lab", "served", "fuzz_daemon"}


UNIT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unit") + os.sep


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    misplaced = [item.nodeid for item in items
                 if str(item.fspath).startswith(UNIT_DIR)
                 and (PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("e2e"))]
    if misplaced:  # tests/unit runs without a daemon or a process: an e2e test belongs in tests/e2e
        raise pytest.UsageError("end-to-end tests in tests/unit: " + ", ".join(misplaced))


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
