"""Real engines from Debian's packages, installed by the tests themselves.

Tests that talk to another system (rsyslog, podman, prometheus, ...) start the
real one. ``require_debian_packages`` makes sure the commands are there: where
the test runs as root with apt (CI does), it installs the packages once per
machine; anywhere else it skips the test with a message that says what to
install.
"""

import os
import shutil
import subprocess
from typing import Iterable, Optional, Sequence

import pytest

# apt's own lock makes a second concurrent apt-get fail at once; wait for it instead.
APT_OPTIONS = ("-o", "DPkg::Lock::Timeout=600", "-o", "Acquire::Retries=3")
_updated = False


def _missing(commands: Iterable[str]) -> list:
    return [c for c in commands if shutil.which(c) is None and not os.path.exists(c)]


def install_debian_packages(packages: Sequence[str], commands: Sequence[str]) -> Optional[str]:
    """Install ``packages`` unless every one of ``commands`` exists; None on success, else why not."""
    global _updated
    if not _missing(commands):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"needs {', '.join(_missing(commands))}: apt-get install {' '.join(packages)} (as root)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = []
    if not _updated:
        steps.append(["apt-get", *APT_OPTIONS, "update", "-q"])
    steps.append(["apt-get", *APT_OPTIONS, "install", "-y", "-q", "--no-install-recommends", *packages])
    for step in steps:
        result = subprocess.run(step, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"{' '.join(step)} failed: {result.stderr.strip()[-500:]}"
        if step[len(APT_OPTIONS) + 1] == "update":
            _updated = True
    still = _missing(commands)
    return f"installed {' '.join(packages)} but {', '.join(still)} still missing" if still else None


def require_debian_packages(packages: Sequence[str], commands: Sequence[str]) -> None:
    """Install the packages when possible (root + apt), else skip the calling test with the reason."""
    reason = install_debian_packages(packages, commands)
    if reason:
        pytest.skip(reason)
