"""The multi-host lab fixture: skips with the reason when rsyslog or namespaces are unavailable."""

import os
import shutil

import pytest

from debian import require_debian_packages

from .netlab import Lab

RSYSLOG_PACKAGES = ["rsyslog", "rsyslog-relp", "iproute2"]
IMRELP = "/usr/lib/x86_64-linux-gnu/rsyslog/imrelp.so"


@pytest.fixture
def lab(tmp_path):
    """lab(**forward options) -> a built Lab with the central rsyslogd running; removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the forwarding lab needs root and iproute2 (network namespaces)")
    require_debian_packages(RSYSLOG_PACKAGES, ["rsyslogd", "ip", "ss"])
    if not any(os.path.exists(p) for p in (IMRELP, "/usr/lib/rsyslog/imrelp.so")):
        require_debian_packages(["rsyslog-relp"], [IMRELP])
    labs = []

    def make(**forward) -> Lab:
        built = Lab(str(tmp_path), forward=forward)
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
