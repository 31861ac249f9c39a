"""Who may connect: peer credentials on ipc (issue 12).

Real second users (useradd) talk to a daemon running as root. The socket's
file permissions are opened up on purpose (as a shared volume might), so
the only thing standing between an unlisted user and the files is the
daemon's check of the kernel's peer credentials.
"""

import os
import subprocess
import uuid
from typing import Iterator, List

import pytest

from clh_writerd import protocol
from clh_writerd.client.control import request
from support import RawClient, check_sequences, read_lines, seq_record

from .conftest import User, shared_log_dir


class Users:
    """Three users and a group, created for the session: alice (not listed),
    bob (a supplementary member of the listed group), carol (listed by name,
    with her own directory)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.group = f"clhg{tag}"
        self.names: List[str] = []
        subprocess.run(["groupadd", "--system", self.group], check=True, capture_output=True)
        for who, extra in (("alice", []), ("bob", ["-G", self.group]), ("carol", [])):
            name = f"clh{who[0]}{tag}"
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *extra, name],
                           check=True, capture_output=True)
            self.names.append(name)
            setattr(self, who, User(name))

    def remove(self) -> None:
        for name in self.names:
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", self.group], capture_output=True)


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    if os.geteuid() != 0:
        pytest.skip("the peer tests need root to create users (CI runs as root)")
    made = Users()
    try:
        yield made
    finally:
        made.remove()


def open_socket(daemon) -> None:
    """Let every local user reach the socket (the daemon's own modes would stop them earlier)."""
    os.chmod(daemon.socket_dir, 0o755)
    os.chmod(daemon.endpoint[len("ipc://"):], 0o666)


def test_only_listed_users_and_groups_get_in_and_peer_dirs_hold(users, start_daemon, base_dir, security_row):
    logs = shared_log_dir(os.path.join(base_dir, "logs"))
    carol_dir = os.path.join(logs, "carol")
    daemon = start_daemon(workdir=base_dir, log_dir=logs, daemon={
        "allowed_uids": [users.carol.name], "allowed_groups": [users.group],
        "peer_dirs": {users.carol.name: [carol_dir]}})
    open_socket(daemon)
    endpoint = daemon.endpoint
    refused_path = os.path.join(logs, "alice.log")

    def alice() -> None:
        client = RawClient(endpoint, "alice")
        try:
            for n in range(5):
                reply = client.write(refused_path, [seq_record("alice", n)])
                assert isinstance(reply, protocol.Error) and reply.code == protocol.E_UNAUTHORIZED, reply
                assert f"uid {os.getuid()}" in reply.message and "allowed_uids" in reply.message, reply
            reply = client.sync(refused_path, seq_record("alice-sync", 0))
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_UNAUTHORIZED, reply
            # Stats and ping need the same rights (stats reveal paths and clients).
            for payload in (protocol.encode_stats_request(), protocol.encode_ping()):
                reply = request(endpoint, payload, 10.0)
                assert isinstance(reply, protocol.Error) and reply.code == protocol.E_UNAUTHORIZED, reply
        finally:
            client.close()

    def bob() -> None:
        client = RawClient(endpoint, "bob")
        try:
            reply = client.write(os.path.join(logs, "bob.log"), [seq_record("bob", n) for n in range(20)])
            assert isinstance(reply, protocol.Ack), reply
            assert isinstance(request(endpoint, protocol.encode_ping(), 10.0), protocol.Ok)
        finally:
            client.close()

    def carol() -> None:
        client = RawClient(endpoint, "carol")
        try:
            reply = client.write(os.path.join(carol_dir, "c.log"), [seq_record("carol", n) for n in range(10)])
            assert isinstance(reply, protocol.Ack), reply
            for path, options in ((os.path.join(logs, "not-carols.log"), {}),
                                  (os.path.join(carol_dir, "lock-elsewhere.log"), {"lock_file_directory": logs})):
                reply = client.write(path, [seq_record("carol-out", 0)], options)
                assert isinstance(reply, protocol.Error) and reply.code == protocol.E_UNAUTHORIZED, reply
                assert "peer_dirs" in reply.message, reply
        finally:
            client.close()

    users.alice.run(alice)
    users.bob.run(bob)
    users.carol.run(carol)
    # Nothing alice sent was written; carol's refused paths were never created.
    assert not os.path.exists(refused_path)
    assert not os.path.exists(os.path.join(logs, "not-carols.log"))
    assert not os.path.exists(os.path.join(carol_dir, "lock-elsewhere.log"))
    check_sequences(read_lines(os.path.join(logs, "bob.log")), {"bob": 20}).assert_complete()
    check_sequences(read_lines(os.path.join(carol_dir, "c.log")), {"carol": 10}).assert_complete()
    doc = daemon.stats()
    counters = doc["daemon"]["counters"]
    assert counters["unauthorized"] == 10, counters
    assert doc["daemon"]["refused_uids"] == {str(users.alice.uid): 8, str(users.carol.uid): 2}
    # Stats name the peers by the kernel's uid and pid, not by what they claim.
    peers = {c["program"]: c for c in doc["clients"]}
    assert peers["bob"]["peer_uid"] == users.bob.uid and peers["bob"]["peer_pid"] > 0
    assert peers["carol"]["peer_uid"] == users.carol.uid
    assert "alice" not in peers or peers["alice"]["records_received"] == 0
    assert daemon.stop() == 0
    security_row("an unlisted local user connects (socket opened to everyone); a listed user writes outside "
                 "its peer_dirs",
                 "unauthorized for batches, sync records, stats and ping; counted per uid; listed group "
                 "member and listed user served",
                 "alice: 8 refusals, nothing written; bob (group member) 20 written; carol: 10 written in her "
                 "directory, 2 refused outside it", 0)


def test_a_client_cannot_change_another_clients_counters(users, start_daemon, base_dir):
    logs = shared_log_dir(os.path.join(base_dir, "logs"))
    daemon = start_daemon(workdir=base_dir, log_dir=logs, daemon={"allowed_groups": [users.group]})
    open_socket(daemon)
    victim = RawClient(daemon.endpoint, "victim")
    try:
        assert isinstance(victim.write(os.path.join(logs, "v.log"), [seq_record("v", 0)]), protocol.Ack)
        victim.send_raw(protocol.encode_report(victim.client, {"dropped": 1, "fallback": 2}, id=7))
        assert isinstance(victim.recv(), protocol.Ok)
        claimed = victim.client  # host, pid, program and session: everything a client says about itself

        def impostor() -> None:
            client = RawClient(daemon.endpoint, "impostor")
            client.client = claimed  # its batches claim to be the victim too
            try:
                client.send_raw(protocol.encode_report(claimed, {"dropped": 999, "fallback": 999}, id=8))
                assert isinstance(client.recv(), protocol.Ok)
                reply = client.write(os.path.join(logs, "i.log"), [seq_record("i", 0)])
                assert isinstance(reply, protocol.Ack), reply
            finally:
                client.close()

        users.bob.run(impostor)
        doc = daemon.stats()
        entries = [c for c in doc["clients"] if c["session"] == claimed.session]
        by_uid = {c["peer_uid"]: c for c in entries}
        assert by_uid[os.getuid()]["reported"] == {"dropped": 1, "fallback": 2}
        assert by_uid[os.getuid()]["peer_pid"] == os.getpid()
        assert by_uid[users.bob.uid]["reported"] == {"dropped": 999, "fallback": 999}
        assert by_uid[users.bob.uid]["records_received"] == 1
        assert by_uid[os.getuid()]["records_received"] == 1
    finally:
        victim.close()
    assert daemon.stop() == 0
