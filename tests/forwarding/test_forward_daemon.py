"""The forwarder inside a real clh-writerd: started by [forward], visible in stats and metrics, stopped by SIGTERM."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from support import DaemonProcess, check_sequences, free_tcp_port, seq_record, wait_for, write_config

from clh_writerd import protocol


def forwarding_daemon(tmp_path, central, **daemon_options) -> DaemonProcess:
    daemon = DaemonProcess(str(tmp_path))
    write_config(daemon.config_path, {
        "daemon": {"endpoint": daemon.endpoint, "allowed_dirs": [daemon.log_dir], **daemon_options},
        "forward": {"target": central.target, "paths": [os.path.join(daemon.log_dir, "*.log")],
                    "state_file": str(tmp_path / "forward.json"), "hostname": "web1"}})
    return daemon


def test_stats_metrics_and_a_clean_stop(tmp_path, central, raw_client):
    pytest.importorskip("prometheus_client")
    central.start()
    port = free_tcp_port()
    daemon = forwarding_daemon(tmp_path, central, metrics_listen=f"127.0.0.1:{port}")
    try:
        daemon.start()
        client = raw_client(daemon.endpoint)
        path = os.path.join(daemon.log_dir, "app.log")
        for k in range(10):
            assert isinstance(client.write(path, [seq_record("w", 50 * k + i) for i in range(50)]), protocol.Ack)
        wait_for(lambda: check_sequences(central.lines(), {"w": 500}).missing_count == 0, 20, "500 records")
        wait_for(lambda: daemon.stats()["forward"]["files"][0]["lag_bytes"] == 0, 10, "no lag")
        fwd = daemon.stats()["forward"]
        assert fwd["connected"] and fwd["acked"] == 500 and fwd["lost_segments"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert f'clh_writerd_forward_connected{{target="{central.target}"}} 1.0' in text
        assert 'clh_writerd_forward_events_total{event="acked"} 500.0' in text
        assert f'clh_writerd_forward_lag_bytes{{path="{path}"}} 0.0' in text
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
    # SIGTERM wrote the checkpoint: the whole file is acknowledged.
    with open(tmp_path / "forward.json") as f:
        (segment,) = json.load(f)["segments"].values()
    assert segment["offset"] == os.path.getsize(path)
    assert "forward: connected" in daemon.stderr()


def test_check_config_rejects_forwarding_without_paths(tmp_path):
    path = write_config(str(tmp_path / "c.toml"), {"forward": {"target": "127.0.0.1:2514"}})
    out = subprocess.run([sys.executable, "-m", "clh_writerd", "check-config", path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "forward.paths is empty" in out.stderr


def test_an_unreadable_checkpoint_is_a_start_up_failure(tmp_path, central):
    daemon = forwarding_daemon(tmp_path, central)
    (tmp_path / "forward.json").write_text("{torn")
    try:
        daemon.start(wait=False)
        assert daemon.proc.wait(30) == 3  # EXIT_STARTUP: refuse rather than resend or skip everything
    finally:
        daemon.cleanup()
    assert "unreadable forward checkpoint" in daemon.stderr()
