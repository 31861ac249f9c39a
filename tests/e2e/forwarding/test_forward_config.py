"""The [forward] section through `clh-writerd check-config`, and `clh-writerd
forward-config rsyslog`; its validation: tests/unit/daemon/test_config.py."""

import subprocess
import sys

import pytest

from support import write_config

from clh_writerd.daemon.config import load_config
from clh_writerd.forward import options_from_config

from .conftest import require_rsyslog


def test_the_section_round_trips_through_check_config(tmp_path):
    path = write_config(str(tmp_path / "c.toml"), {"forward": {
        "target": "central.example:2514", "paths": ["/var/log/app/*.log"], "window": 64, "hostname": "web1"}})
    out = subprocess.run([sys.executable, "-m", "clh_writerd", "check-config", path],
                         capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "[forward]" in out.stdout and 'target = "central.example:2514"' in out.stdout
    (tmp_path / "again.toml").write_text(out.stdout)
    again = load_config(str(tmp_path / "again.toml"))
    options = options_from_config(again)
    assert options.address() == ("central.example", 2514)
    assert options.window == 64 and options.hostname == "web1" and options.paths == ("/var/log/app/*.log",)


@pytest.mark.parametrize("output", ["/var/log/central.log", "/var/log/clh/%HOSTNAME%/%APP-NAME%"])
def test_the_central_config_is_valid_rsyslog(tmp_path, output):
    require_rsyslog()
    conf = subprocess.run([sys.executable, "-m", "clh_writerd", "forward-config", "rsyslog", "--output", output,
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert conf.returncode == 0, conf.stderr
    assert 'queue.type="Direct"' in conf.stdout  # part of the guarantee (docs/forwarding.md)
    if "%" in output:  # a sender must not choose a path outside the output directory
        assert "%HOSTNAME:::secpath-replace%/%APP-NAME:::secpath-replace%" in conf.stdout
    (tmp_path / "central.conf").write_text(conf.stdout)
    check = subprocess.run(["rsyslogd", "-N1", "-f", str(tmp_path / "central.conf")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr + check.stdout


def test_the_tls_central_names_its_clients():
    """--tls never generates certvalid (which accepted foreign-CA and self-signed clients, issue 29)."""

    def forward_config(*args):
        return subprocess.run([sys.executable, "-m", "clh_writerd", "forward-config", "rsyslog", "--tls", *args],
                              capture_output=True, text=True, timeout=30)

    refused = forward_config()
    assert refused.returncode == 2 and "permitted peer" in refused.stderr
    assert forward_config("--tls-permit", "web1.example", "--tls-permit", "SHA256:AB:CD").returncode == 2
    conf = forward_config("--tls-permit", "web1.example", "--tls-permit", "*.app.example")
    assert conf.returncode == 0, conf.stderr
    assert 'tls.authMode="name" tls.permittedPeer=["web1.example", "*.app.example"]' in conf.stdout
    assert "certvalid" not in conf.stdout
    pinned = forward_config("--tls-permit", "SHA256:01:AB:CD")
    assert 'tls.authMode="fingerprint" tls.permittedPeer=["SHA256:01:AB:CD"]' in pinned.stdout
    # A real rsyslogd runs the name mode in test_forwarder.py (it checks the certificate files exist).
