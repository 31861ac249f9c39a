"""The end-to-end house: every test under tests/e2e is marked e2e; the
shared fixtures that start real daemon subprocesses, always cleaned up."""

import os
from typing import Any, Callable, List

import pytest


from support import DaemonProcess, RawClient

E2E_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    # By path, not by a hand-kept list: `make test-fast` (tests/unit) never collects these.
    for item in items:
        if str(item.fspath).startswith(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


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
