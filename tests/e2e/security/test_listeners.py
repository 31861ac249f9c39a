"""Round two (issue 25): who can listen.

A client must hand its records only to a daemon something vouches for. In
each attack mallory (a real second user) listens where the victim's app
would connect - in a group-writable socket directory, on an abstract unix
socket, on a tcp port - with a fake daemon that acks everything and keeps
every payload. The app must not connect, must write every record through
its fallback, and must warn once with the reason; the fake must receive
nothing. A negative control (tcp_auth='none') shows the fake does receive
what a client sends it.
"""

import logging
import os
import shutil
import signal
import stat
import uuid
import warnings
from typing import Callable, Dict, List

import pytest
import zmq

from clh_writerd import create_nonblocking_handler, protocol
from support import check_sequences, free_tcp_port, read_lines, seq_record, wait_for

from .conftest import shared_log_dir
from .test_budgets import DRAIN, crowd, serve, signal_file  # noqa: F401 (the module-scoped users)


def forked_as(user, action: Callable[[], int]) -> int:
    """Fork, become ``user`` with its groups (as a login would set them), run action; the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups(os.getgrouplist(user.name, user.gid))
            os.setgid(user.gid)
            os.setuid(user.uid)
            code = action()
        except BaseException as exc:
            os.write(2, f"child failed: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(code)
    return pid

RECORDS = 100


def fake_daemon(endpoint: str, seen: str, bound: str) -> int:
    """mallory's listener: answers like a daemon (acks, pings) and keeps every payload it gets."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind(endpoint)
    if endpoint.startswith("ipc:///"):
        os.chmod(endpoint[len("ipc://"):], 0o777)
    with open(bound, "w"):
        pass
    while True:
        frames = sock.recv_multipart()
        with open(seen, "a") as f:
            f.write(("records " if b"SEQ app" in frames[-1] else "") + repr(frames[-1][:60]) + "\n")
        try:
            request = protocol.decode_request(frames[-1])
        except protocol.ProtocolError:
            continue
        if isinstance(request, protocol.Batch):
            reply = protocol.encode_ack(request.seq)
        else:
            reply = protocol.encode_ok(getattr(request, "id", 0), {"max_message_bytes": 1 << 20, "protocol": 1})
        sock.send_multipart(frames[:-1] + [reply])


def log_through(endpoint: str, path: str, **options) -> Dict:
    """The victim's app: RECORDS records (every 20th at sync level) through a handler on ``endpoint``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handler = create_nonblocking_handler(path, endpoint=endpoint, connect_timeout=1.0, **options)
        logger = logging.getLogger(f"victim-{uuid.uuid4().hex}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        try:
            for n in range(RECORDS):
                (logger.error if n % 20 == 0 else logger.info)(seq_record("app", n))
            handler.flush()
            stats = handler.get_stats()
        finally:
            logger.removeHandler(handler)
            handler.close()
    return {"stats": stats, "warnings": [str(w.message) for w in caught if "not connecting to" in str(w.message)]}


class Listener:
    """mallory's fake daemon, running as her until stop()."""

    def __init__(self, user, endpoint: str, base_dir: str) -> None:
        self.seen = signal_file(base_dir, f"seen-{uuid.uuid4().hex[:6]}")
        bound = signal_file(base_dir, f"bound-{uuid.uuid4().hex[:6]}")
        self.pid = forked_as(user, lambda: fake_daemon(endpoint, self.seen, bound))
        wait_for(lambda: os.path.exists(bound), what="mallory's listener to bind")

    def received(self) -> List[str]:
        if not os.path.exists(self.seen):
            return []
        with open(self.seen) as f:
            return f.read().splitlines()

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _assert_refused(result: Dict, path: str, listener: Listener, reason: str) -> None:
    check_sequences(read_lines(path), {"app": RECORDS}).assert_complete()  # all written, by the fallback
    assert result["stats"]["state"] == "fallback", result["stats"]
    assert len(result["warnings"]) == 1 and reason in result["warnings"][0], result["warnings"]
    assert listener.received() == [], "mallory's listener received something"


def test_a_group_member_cannot_take_the_socket_of_a_group_writable_directory(crowd, start_daemon, base_dir,  # noqa: F811
                                                                              security_row):
    # The configuration that allowed it is refused (exit 2) ...
    refused = start_daemon(wait=False, workdir=base_dir, daemon={"socket_dir_mode": 0o770,
                                                                 "socket_group": crowd.group})
    assert exit_code_of(refused) == 2 and "lets the group write" in refused.stderr()
    # ... and a directory left that way is refused by daemon (exit 3) and clients alike.
    directory = os.path.join("/tmp", f"cw-g-{uuid.uuid4().hex[:8]}")
    os.mkdir(directory)
    os.chown(directory, 0, grp_id(crowd.group))
    os.chmod(directory, 0o770)
    logs = shared_log_dir(os.path.join(base_dir, "logs"))
    endpoint = f"ipc://{directory}/w.sock"
    listener = None
    try:
        daemon = start_daemon(wait=False, workdir=os.path.join(base_dir, "logs"), endpoint=endpoint,
                              daemon={"socket_dir_mode": 0o750, "socket_group": crowd.group})
        assert exit_code_of(daemon) == 3 and "never write the directory" in daemon.stderr(), daemon.stderr()
        listener = Listener(crowd.mallory, endpoint, base_dir)  # she may write there: she binds first
        path = os.path.join(logs, "app.log")
        result = log_through(endpoint, path, socket_group=crowd.group)
        _assert_refused(result, path, listener, "the group may connect (0o750), never write the directory")
    finally:
        if listener is not None:
            listener.stop()
        shutil.rmtree(directory, ignore_errors=True)
    security_row("socket_dir_mode 0o770 with socket_group, accepted by both sides: a member binds the socket "
                 "in the daemon's place (was: 50/50 records stolen and acked)",
                 "the config is refused (exit 2); a group-writable directory is refused by the daemon (exit 3) and "
                 "by clients, which write through the fallback and warn once",
                 f"exit 2, exit 3; {RECORDS} records in the real file; the member's listener received nothing", 0)


def exit_code_of(daemon) -> int:
    return daemon.proc.wait(30)


def grp_id(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


@pytest.mark.parametrize("transport", ["abstract", "tcp"])
def test_a_client_never_sends_to_a_listener_nothing_vouches_for(crowd, start_daemon, base_dir, transport,  # noqa: F811
                                                                security_row):
    logs = shared_log_dir(os.path.join(base_dir, "logs"))
    if transport == "abstract":
        endpoint = f"ipc://@clh-writerd-{uuid.uuid4().hex[:8]}"
        refused = start_daemon(wait=False, workdir=base_dir, endpoint=endpoint)
        assert exit_code_of(refused) == 2 and "abstract ipc endpoints" in refused.stderr()
        assert not os.path.exists(os.path.join(base_dir, endpoint[len("ipc://"):]))  # no file ./@name
        reason = "abstract ipc endpoints (ipc://@name) are refused"
    else:
        endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
        reason = "no CURVE key for the daemon"
    listener = Listener(crowd.mallory, endpoint, base_dir)
    try:
        path = os.path.join(logs, "app.log")
        result = log_through(endpoint, path)
        _assert_refused(result, path, listener, reason)
        if transport == "tcp":
            # The negative control: told to send in the clear, the client does, and mallory gets it.
            clear = os.path.join(logs, "clear.log")
            log_through(endpoint, clear, tcp_auth="none")
            wait_for(lambda: any(line.startswith("records") for line in listener.received()),
                     what="the cleartext records to reach the listener")
    finally:
        listener.stop()
    security_row({"abstract": "ipc://@name: the daemon bound a file ./@name (and chmodded its cwd 0700) while "
                              "clients connected to the abstract name anyone can bind (was: 50/50 stolen)",
                  "tcp": "a client with a tcp endpoint and no server key sends to whoever holds the port "
                         "(was: 50/50 stolen)"}[transport],
                 {"abstract": "the daemon refuses the endpoint (exit 2); a client does not connect, writes through "
                              "the fallback and warns once",
                  "tcp": "a client without curve_server_key does not connect unless tcp_auth='none': fallback, "
                         "one warning"}[transport],
                 f"{RECORDS} records in the real file; mallory's listener received nothing"
                 + ("; with tcp_auth='none' it received them (negative control)" if transport == "tcp" else ""), 0)


def test_key_files_others_can_write_are_refused_and_a_planted_key_is_never_admitted(crowd, start_daemon, base_dir,  # noqa: F811
                                                                                     tmp_path, monkeypatch,
                                                                                     security_row):
    from clh_writerd.daemon.access import write_key_pair

    keys = str(tmp_path / "keys")
    server = write_key_pair(keys, "server")[1]
    app = write_key_pair(keys, "app")
    admitted = tmp_path / "clients"
    admitted.mkdir()
    shutil.copy(app[0], admitted)
    monkeypatch.setenv("CLH_WRITERD_CURVE_SERVER_KEY", server[: -len("_secret")])
    monkeypatch.setenv("CLH_WRITERD_CURVE_SECRET_KEY", app[1])
    port = free_tcp_port()
    config = {"curve_secret_key": server, "curve_public_keys_dir": str(admitted)}

    os.chmod(server, 0o644)  # the issue: a 0644 secret key was accepted
    daemon = start_daemon(wait=False, workdir=base_dir, endpoint=f"tcp://127.0.0.1:{port}", daemon=config)
    assert exit_code_of(daemon) == 3 and "readable by group or others" in daemon.stderr(), daemon.stderr()
    os.chmod(server, 0o600)
    os.chown(admitted, crowd.mallory.uid, crowd.mallory.gid)  # the issue: an attacker-owned 0777 keys dir
    os.chmod(admitted, 0o777)
    again = tmp_path / "again"
    again.mkdir()
    daemon = start_daemon(wait=False, workdir=str(again), endpoint=f"tcp://127.0.0.1:{port}", daemon=config)
    assert exit_code_of(daemon) == 3 and "curve_public_keys_dir" in daemon.stderr(), daemon.stderr()

    # Served from a proper directory; then it becomes writable and mallory plants her key: a reload
    # does not admit it.
    os.chown(admitted, 0, 0)
    os.chmod(admitted, 0o755)
    third = tmp_path / "third"
    third.mkdir()
    daemon = start_daemon(workdir=str(third), endpoint=f"tcp://127.0.0.1:{port}", daemon=config)
    planted = write_key_pair(str(tmp_path / "mallory-keys"), "mallory")
    os.chmod(admitted, 0o777)
    shutil.copy(planted[0], admitted)
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the admitted keys" in daemon.stderr(), what="the reload to refuse the directory")
    import zmq.auth

    from support import RawClient

    curve = (zmq.auth.load_certificate(server[: -len("_secret")])[0], *zmq.auth.load_certificate(planted[1]))
    intruder = RawClient(daemon.endpoint, "planted", curve=curve)
    try:
        intruder.send_batch(os.path.join(daemon.log_dir, "x.log"), ["planted"])
        assert intruder.try_recv(1.0) is None  # her handshake is refused: nothing read
    finally:
        intruder.close()
    assert not os.path.exists(os.path.join(daemon.log_dir, "x.log"))
    assert daemon.stop() == 0
    # A client refuses its own secret key when others can read it, as ssh does.
    os.chmod(app[1], 0o644)
    with pytest.raises(ValueError, match="readable by group or others"):
        create_nonblocking_handler(os.path.join(base_dir, "c.log"), endpoint=daemon.endpoint,
                                   curve_server_key=server[: -len("_secret")], curve_secret_key=app[1])
    assert stat.S_IMODE(os.stat(server).st_mode) == 0o600
    security_row("a 0644 secret key; an attacker-owned 0777 keys directory; a key planted after start, then SIGHUP "
                 "(was: accepted, her planted key admitted after SIGHUP)",
                 "as ssh: refused at start (exit 3) naming the file; at a reload the directory is not re-read "
                 "(error logged, admitted keys kept); a client refuses its own readable secret key",
                 "exit 3 twice; the planted key's handshake refused after SIGHUP, nothing written; client "
                 "ValueError", 0)
