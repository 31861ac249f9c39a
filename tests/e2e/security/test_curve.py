"""Authenticated tcp (issue 12): CURVE keys from `clh-writerd keygen`.

A client without CURVE, or with a key the daemon does not list, is refused
at the handshake (nothing it sends is read, let alone written) and counted
in ``auth_failures``; a client with a listed key is served, by the raw
protocol and by the real handler configured with its key paths.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys

import zmq.auth

from clh_writerd import create_nonblocking_handler, protocol
from support import check_sequences, free_tcp_port, read_lines, seq_record, wait_for


def keygen(directory: str, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "clh_writerd", "keygen", directory, "--name", name],
                         capture_output=True, text=True, check=True)
    assert "secret key:" in out.stdout
    return os.path.join(directory, name)


def curve_of(server: str, client: str):
    server_public, _ = zmq.auth.load_certificate(server + ".key")
    public, secret = zmq.auth.load_certificate(client + ".key_secret")
    return server_public, public, secret


def test_tcp_needs_a_listed_curve_key(start_daemon, raw_client, tmp_path, monkeypatch, security_row):
    keys = str(tmp_path / "keys")
    server, app, intruder = (keygen(keys, n) for n in ("server", "app", "intruder"))
    assert os.stat(server + ".key_secret").st_mode & 0o777 == 0o600
    admitted = tmp_path / "clients"
    admitted.mkdir()
    shutil.copy(app + ".key", admitted)
    # `clh-writerd stats`/`ping` (and the fixture's readiness ping) take the keys from the environment.
    monkeypatch.setenv("CLH_WRITERD_CURVE_SERVER_KEY", server + ".key")
    monkeypatch.setenv("CLH_WRITERD_CURVE_SECRET_KEY", app + ".key_secret")
    daemon = start_daemon(endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", daemon={
        "curve_secret_key": server + ".key_secret", "curve_public_keys_dir": str(admitted)})
    path = os.path.join(daemon.log_dir, "tcp.log")

    plain = raw_client(daemon.endpoint)
    plain.send_batch(path, [seq_record("plain", 0)])
    stranger = raw_client(daemon.endpoint, curve=curve_of(server, intruder))
    stranger.send_batch(path, [seq_record("intruder", 0)])
    assert plain.try_recv(1.0) is None and stranger.try_recv(0.5) is None
    # The unknown key is refused by the daemon's ZAP handler (always counted); a client
    # without CURVE is counted too unless it hangs up first on seeing the mechanism.
    wait_for(lambda: daemon.stats()["daemon"]["counters"]["auth_failures"] >= 1, what="a refused handshake")

    # The listed key: the raw protocol and the real handler (key paths as options).
    good = raw_client(daemon.endpoint, curve=curve_of(server, app))
    assert isinstance(good.write(path, [seq_record("good", n) for n in range(20)]), protocol.Ack)
    handler = create_nonblocking_handler(os.path.join(daemon.log_dir, "app.log"), endpoint=daemon.endpoint,
                                         curve_server_key=server + ".key", curve_secret_key=app + ".key_secret")
    logger = logging.getLogger("curve-app")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for n in range(100):
            logger.info(seq_record("app", n))
        logger.error(seq_record("sync", 0))
        handler.flush()
        assert handler.get_stats()["state"] == "daemon", handler.get_stats()
        assert handler.get_stats()["fallback_written"] == 0
    finally:
        logger.removeHandler(handler)
        handler.close()
    check_sequences(read_lines(os.path.join(daemon.log_dir, "app.log")), {"app": 100, "sync": 1}).assert_complete()
    doc = daemon.stats()
    app_public = zmq.auth.load_certificate(app + ".key")[0].decode()
    assert {c["peer_key"] for c in doc["clients"]} == {app_public}

    # A key added to the directory is admitted after a reload.
    shutil.copy(intruder + ".key", admitted)
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.stats()["daemon"]["counters"]["reloads"] == 1, what="the reload")
    late = raw_client(daemon.endpoint, curve=curve_of(server, intruder))
    assert isinstance(late.write(path, [seq_record("late", 0)]), protocol.Ack)
    # Nothing the refused clients sent was written.
    check_sequences(read_lines(path), {"good": 20, "late": 1}).assert_complete()
    assert daemon.stop() == 0
    security_row("tcp client without CURVE, or with a key not in curve_public_keys_dir",
                 "refused at the handshake (nothing read or written), counted in auth_failures; a listed key "
                 "is served",
                 "both refused at the handshake, their batches never written; 20 raw + 101 handler records written "
                 "for the listed key", 0)


def test_plain_tcp_only_with_tcp_auth_none(start_daemon, tmp_path):
    daemon = start_daemon(wait=False, endpoint=f"tcp://127.0.0.1:{free_tcp_port()}")
    assert daemon.proc.wait(30) == 2  # a config error: tcp without keys and without tcp_auth = "none"
    assert "needs CURVE keys" in daemon.stderr() and 'tcp_auth = "none"' in daemon.stderr()
