"""Shared fixtures: real daemon subprocesses that are always cleaned up."""

import os
from typing import Any, Callable, List

import pytest


from support import DaemonProcess, RawClient

# Fixtures that start real processes: a test that uses one is end to end
# (marked e2e here, so `make test-fast` leaves it out without a hand-kept list).
PROCESS_FIXTURES = {"start_daemon", "daemon", "raw_client", "image", "crowd", "central", "lab", "served", "fuzz_daemon"}


UNIT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unit") + os.sep


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    misplaced = []
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)
            if str(item.fspath).startswith(UNIT_DIR):
                misplaced.append(item.nodeid)
    if misplaced:  # tests/unit runs without a daemon or a process: an e2e test belongs elsewhere
        raise pytest.UsageError("end-to-end tests in tests/unit: " + ", ".join(misplaced))


@pytest.fixture
def start_daemon(tmp_path) -> Callable[..., DaemonProcess]:
    """start_daemon(**config) -> a running DaemonProcess writing under tmp_path/logs."""
    started: List[DaemonProcess] = []

    def start(wait: bool = True, **kwargs: Any) -> DaemonProcess:
        workdir = kwargs.pop("workdir", None) or str(tmp_path)
        daemon = DaemonProcess(workdir, **kwargs)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    for daemon in started:
        daemon.cleanup()


@pytest.fixture
def raw_client() -> Callable[[str], RawClient]:
    clients: List[RawClient] = []

    def make(endpoint: str, program: str = "raw-test-client", curve: Any = None) -> RawClient:
        client = RawClient(endpoint, program, curve=curve)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def guarantee(request):
    """guarantee(scenario, what, records, missing, duplicates[, note]): a row of docs/guarantees.md."""
    from support import record_guarantee

    def record(scenario: str, what: str, records: int, missing: int, duplicates: int, note: str = "") -> None:
        record_guarantee(request.node.nodeid, scenario, what, records, missing, duplicates, note)

    return record
