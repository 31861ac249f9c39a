"""A socket directory nobody else can own (issue 12).

The attack: without XDG_RUNTIME_DIR (services, cron, containers) the default
endpoint is /tmp/clh-writerd-<uid>/writerd.sock, and /tmp is everyone's. A
second user creates that directory first (world-writable, as the issue's
squatter did), optionally with a fake daemon in it that answers pings and
acks every batch. The victim's real daemon must refuse to start there; the
victim's app must not connect, must write every record (its sync-level
ERROR ones too) through the fallback, and must warn once naming the reason.

Every process here is a fork of the test process with another uid (the
interpreter under /root is not executable by other users).
"""

import json
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from typing import Callable, Optional

import pytest
import zmq
import zmq.utils.monitor  # noqa: F401 (imported before the forks: they cannot read the stdlib under /root)

from clh_writerd import protocol
from clh_writerd import create_nonblocking_handler
from clh_writerd.daemon.config import load_config
from clh_writerd.daemon.server import EXIT_STARTUP, Server, configure_logging
from support import check_sequences, read_lines, seq_record, wait_for, write_config

from .conftest import shared_log_dir
from .test_peers import users  # noqa: F401 (the module-scoped fixture)

RECORDS = 200


def forked(uid: int, gid: int, action: Callable[[], int], stderr_path: Optional[str] = None) -> int:
    """Fork, become uid/gid, run action; the child's pid (its exit code is action's result)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if stderr_path:
                fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
                os.dup2(fd, 2)
                sys.stderr = os.fdopen(2, "w", buffering=1)  # pytest's capture object is the parent's
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = action()
        except BaseException as exc:
            os.write(2, f"child failed: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(code)
    return pid


def exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def fake_daemon(endpoint: str, seen_path: str) -> int:
    """What the squatter runs: a ROUTER that answers like a daemon and keeps every payload."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind(endpoint)
    os.chmod(endpoint[len("ipc://"):], 0o777)  # anyone may connect: the victim must choose not to
    with open(seen_path, "w"):
        pass
    while True:
        frames = sock.recv_multipart()
        with open(seen_path, "a") as f:
            f.write(repr(frames[-1][:200]) + "\n")
        try:
            request = protocol.decode_request(frames[-1])
        except protocol.ProtocolError:
            continue
        if isinstance(request, protocol.Batch):
            reply = protocol.encode_ack(request.seq)
        else:
            reply = protocol.encode_ok(getattr(request, "id", 0), {"max_message_bytes": 1 << 20})
        sock.send_multipart(frames[:-1] + [reply])


@pytest.mark.parametrize("listener", [False, True], ids=["empty", "fake-listener"])
def test_a_squatted_tmp_directory_is_refused_by_daemon_and_client(users, base_dir, listener,  # noqa: F811
                                                                  security_row):
    victim, squatter = users.carol, users.alice
    squat = f"/tmp/clh-writerd-{victim.uid}"
    endpoint = f"ipc://{squat}/writerd.sock"
    logs = shared_log_dir(os.path.join(base_dir, "logs"))
    seen = os.path.join(logs, "squatter-saw.txt")
    shutil.rmtree(squat, ignore_errors=True)
    fake = None
    try:
        def create() -> int:
            os.mkdir(squat)
            os.chmod(squat, 0o777)  # left world-writable: the worst case
            return 0

        assert exit_code(forked(squatter.uid, squatter.gid, create)) == 0
        if listener:
            fake = forked(squatter.uid, squatter.gid, lambda: fake_daemon(endpoint, seen))
            wait_for(lambda: os.path.exists(seen), what="the fake daemon to listen")

        # The victim's real daemon refuses to serve from there (exit 3, reason named).
        config = write_config(os.path.join(base_dir, "victim.toml"),
                              {"daemon": {"endpoint": endpoint, "allowed_dirs": [logs]}})
        daemon_err = os.path.join(logs, "daemon.stderr")

        def run_daemon() -> int:
            configure_logging("info")
            return Server(load_config(config), config).run()

        assert exit_code(forked(victim.uid, victim.gid, run_daemon, daemon_err)) == EXIT_STARTUP
        with open(daemon_err) as f:
            said = f.read()
        assert f"refusing to serve from {squat}" in said and f"uid {squatter.uid}" in said, said

        # The victim's app, on the default endpoint (no XDG_RUNTIME_DIR), logs normally.
        path = os.path.join(logs, "app.log")
        result = os.path.join(logs, "result.json")

        def app() -> int:
            os.environ.pop("XDG_RUNTIME_DIR", None)
            os.environ.pop("CLH_WRITERD_ENDPOINT", None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                handler = create_nonblocking_handler(path, connect_timeout=2.0)
                logger = logging.getLogger(f"victim-{os.getpid()}")
                logger.propagate = False
                logger.setLevel(logging.INFO)
                logger.addHandler(handler)
                for n in range(RECORDS):
                    logger.info(seq_record("app", n))
                    if n % 50 == 0:
                        logger.error(seq_record("sync", n // 50))
                handler.flush()
                stats = handler.get_stats()
                handler.close()
            with open(result, "w") as f:
                json.dump({"endpoint": handler.endpoint, "stats": stats,
                           "warnings": [str(w.message) for w in caught]}, f)
            return 0

        assert exit_code(forked(victim.uid, victim.gid, app)) == 0
        with open(result) as f:
            out = json.load(f)
        assert out["endpoint"] == endpoint
        # Every record is in the real file, written by the app itself.
        check_sequences(read_lines(path), {"app": RECORDS, "sync": RECORDS // 50}).assert_complete()
        assert out["stats"]["state"] == "fallback", out["stats"]
        trust_warnings = [w for w in out["warnings"] if "not connecting to" in w]
        assert len(trust_warnings) == 1, out["warnings"]
        assert f"owned by uid {squatter.uid}" in trust_warnings[0] and squat in trust_warnings[0]
        if listener:
            with open(seen) as f:
                assert f.read() == "", "the squatter received something"
    finally:
        if fake is not None:
            os.kill(fake, signal.SIGKILL)
            os.waitpid(fake, 0)
        shutil.rmtree(squat, ignore_errors=True)
    security_row(f"a second user pre-creates /tmp/clh-writerd-<uid> (0777){' and listens in it' if listener else ''}",
                 "the victim's daemon refuses to start (exit 3, owner named); its app does not connect, writes "
                 "through the fallback and warns once with the reason",
                 f"daemon exit 3; {RECORDS + RECORDS // 50} records (sync ones too) in the real file; "
                 "the squatter received nothing", 0)


def test_the_daemon_refuses_a_directory_others_may_write_even_its_own(start_daemon, tmp_path):
    directory = os.path.join("/tmp", f"cw-own-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(directory)
    (tmp_path / "again").mkdir()
    try:
        os.chmod(directory, 0o777)
        daemon = start_daemon(wait=False, endpoint=f"ipc://{directory}/w.sock")
        assert daemon.proc.wait(30) == EXIT_STARTUP
        assert "writable by others" in daemon.stderr()
        # Fixed by its owner, it serves (and tightens the mode to socket_dir_mode).
        os.chmod(directory, 0o755)
        daemon = start_daemon(endpoint=f"ipc://{directory}/w.sock", workdir=str(tmp_path / "again"))
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert os.stat(daemon.endpoint[len("ipc://"):]).st_mode & 0o777 == 0o600
        assert daemon.stop() == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
