"""What runs where (README, Platforms): elsewhere than supported, the
handlers and the daemon refuse at once with an error that says why and what
to use instead, rather than failing later on a missing feature.

This suite runs on Linux; the other platforms are stood in for by changing
what the check reads (sys.platform, os.name), which is all it reads.
"""

import os
import sys

import pytest
from click.testing import CliRunner

from clh_writerd import cli, create_nonblocking_handler
from clh_writerd._compat import unsupported_platform


def test_linux_runs_both():
    assert sys.platform.startswith("linux")
    assert unsupported_platform("daemon") == "" and unsupported_platform("handler") == ""


def test_a_handler_on_windows_says_to_use_clh_directly(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(RuntimeError, match="need a POSIX system.*ConcurrentRotatingFileHandler directly"):
        create_nonblocking_handler(str(tmp_path / "app.log"), endpoint=None)
    assert not (tmp_path / "app.log").exists()


def test_the_daemon_on_macos_refuses_to_start_and_says_why(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    result = CliRunner().invoke(cli.main, ["run"])
    assert result.exit_code == 3  # a start-up failure
    assert "runs on Linux only (this is darwin)" in result.output and "endpoint=None" in result.output
