"""Unit tests of daemon.listener without a daemon process: a real zmq
context, a real ipc socket in a temporary directory, a real client socket.
What the server relies on: one listener per endpoint (the lock), the socket
file's mode, its directory refused when someone else could swap it, the
limits derived from the descriptors, and close()/unlock() giving the
endpoint back."""

import os
import shutil
import stat

import pytest
import zmq

from clh_writerd import protocol
from clh_writerd.daemon.config import config_from_mapping
from clh_writerd.daemon.errors import StartupError
from clh_writerd.daemon.listener import FDS_PER_FILE, Listener, derived_limits, hard_frame_limit
from clh_writerd.daemon.stats import DaemonStats
from support import short_socket_dir


def _listener(sock_dir: str, logs: str, context: zmq.Context) -> Listener:
    config = config_from_mapping({"daemon": {"endpoint": f"ipc://{sock_dir}/d.sock", "allowed_dirs": [logs]}})
    stats = DaemonStats(config.endpoint, config.max_clients, config.clients_gone_after)
    stats.limits = derived_limits(1024, config.max_files, config.max_connections)
    return Listener(config, stats, context, lambda: 0)


@pytest.fixture
def sock_root():
    root = short_socket_dir()  # unix socket paths are limited to 107 bytes
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def test_one_listener_per_endpoint_and_the_endpoint_given_back(tmp_path, sock_root, context):
    sock_dir = os.path.join(sock_root, "listener")
    first = _listener(sock_dir, str(tmp_path), context)
    sock = first.open()
    path = os.path.join(sock_dir, "d.sock")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # no socket_group: the owner only
        assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700
        client = context.socket(zmq.DEALER)
        client.connect(f"ipc://{path}")
        client.send(protocol.encode_ping(1))
        assert sock.poll(5000), "the bound socket received nothing"
        frames = sock.recv_multipart(copy=False)
        assert first.source_fd(frames[-1]) >= 0 and first.user_id(frames[-1]) is None  # ipc: no CURVE key
        client.close(linger=0)
        second = _listener(sock_dir, str(tmp_path), context)
        with pytest.raises(StartupError, match=f"already serving.*{path}"):
            second.open()
        second.close()
        assert os.path.exists(path), "the refused listener must not remove the running one's socket"
    finally:
        first.close()
        first.unlock()
    assert not os.path.exists(path)
    third = _listener(sock_dir, str(tmp_path), context)
    third.open()  # the endpoint is free again
    third.close()
    third.unlock()


def test_a_socket_directory_someone_else_can_write_is_refused(tmp_path, sock_root, context):
    sock_dir = os.path.join(sock_root, "open")
    os.makedirs(sock_dir)
    os.chmod(sock_dir, 0o777)  # anyone could move the socket aside and listen in its place
    listener = _listener(sock_dir, str(tmp_path), context)
    with pytest.raises(StartupError, match="refusing to serve from"):
        listener.open()
    listener.close()
    assert os.listdir(sock_dir) == []


def test_limits_leave_descriptors_for_files_and_a_reserve():
    limits = derived_limits(1024, max_files=1000, max_connections=100_000)
    reserve = limits["fd_reserve"]
    assert reserve >= 1024 // 4
    # Files get at most half of what is left, connections the rest: never more than exists.
    assert limits["max_files"] * FDS_PER_FILE <= (1024 - reserve) // 2
    assert limits["max_files"] * FDS_PER_FILE + limits["connections"] + reserve <= 1024
    assert derived_limits(1024, 10, 50)["connections"] == 50  # max_connections caps them
    assert hard_frame_limit(1 << 20) == 2 << 20  # twice the limit reaches Python, to be refused with a reply
