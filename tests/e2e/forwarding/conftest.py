"""The multi-host lab fixture: skips with the reason when rsyslog or namespaces are unavailable."""

import os
import shutil
from typing import Sequence

import pytest

from support.debian import require_debian_packages

from .netlab import Lab, LoopbackCentral

RSYSLOG_PACKAGES = ["rsyslog", "rsyslog-relp", "iproute2"]
IMRELP = "/usr/lib/x86_64-linux-gnu/rsyslog/imrelp.so"


def require_rsyslog() -> None:
    require_debian_packages(RSYSLOG_PACKAGES, ["rsyslogd", "ip", "ss"])
    if not any(os.path.exists(p) for p in (IMRELP, "/usr/lib/rsyslog/imrelp.so")):
        pytest.skip(f"rsyslogd is installed but imrelp is not ({IMRELP}): apt-get install rsyslog-relp")


@pytest.fixture
def central(tmp_path):
    """A real rsyslogd with imrelp on 127.0.0.1 (the generated central config), not started yet."""
    require_rsyslog()
    made = LoopbackCentral(str(tmp_path / "central"))
    yield made
    made.stop()


@pytest.fixture
def lab(tmp_path):
    """lab(hosts=3, central_args=(), **forward options) -> a built Lab with the central running; removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the forwarding lab needs root and iproute2 (network namespaces)")
    require_rsyslog()
    labs = []

    def make(hosts: int = 3, central_args: Sequence[str] = (), **forward) -> Lab:
        built = Lab(str(tmp_path), hosts=hosts, forward=forward)
        built.central_args = list(central_args)
        labs.append(built)
        try:
            built.build()
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        built.start_central()
        return built

    yield make
    for built in labs:
        built.close()
