"""No single message stops or wedges the daemon.

The deep-path messages are real attacks (about 2 KB each); the exceptions in
the second test are injected (a ``sitecustomize`` in the daemon subprocess,
as support.slow_disk_env does) because no well-formed message should reach
an unexpected exception any more: that test proves the isolation itself.
"""

import os
import signal

from clh_writerd import protocol
from support import seq_record

from .conftest import HonestClient, describe_resources, resources

FAULTS_SITECUSTOMIZE = '''\
"""Test-only: raise on chosen paths, in the main loop and in a writer thread."""
from clh_writerd.daemon import writers

_route = writers.Router.route
_write = writers.FileWriter._write


def route(self, path, options, *args):
    if "/boom-main" in path:
        raise RecursionError("maximum recursion depth exceeded (injected)")
    return _route(self, path, options, *args)


def write(self, items, *args):
    if "/boom-writer" in self.path:
        raise MemoryError("injected")
    return _write(self, items, *args)


writers.Router.route = route
writers.FileWriter._write = write
'''


def test_deep_paths_are_refused_not_fatal(start_daemon, raw_client, security_row):
    daemon = start_daemon()
    client = raw_client(daemon.endpoint, "attacker")
    logs = daemon.log_dir
    deep = os.path.join(logs, *(["a"] * 1000), "x.log")  # ~2 KB: RecursionError in os.makedirs before
    before = resources(daemon.proc.pid)
    with HonestClient(daemon.endpoint, os.path.join(logs, "honest.log")) as honest:
        for _ in range(20):
            reply = client.write(deep, [seq_record("a", 0)])
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_FORBIDDEN_PATH, reply
            assert "max_path_depth" in reply.message
            reply = client.write(os.path.join(logs, "l.log"), [seq_record("a", 0)],
                                 {"lock_file_directory": os.path.dirname(deep)})
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_FORBIDDEN_PATH, reply
        # At the limit it is written (the walk is iterative: no depth can make it recurse).
        ok = os.path.join(logs, *(["b"] * 15), "x.log")
        assert isinstance(client.write(ok, [seq_record("ok", 0)]), protocol.Ack)
        honest.stop()
        lost = honest.lost()
    assert not os.path.exists(os.path.join(logs, "a"))
    after = resources(daemon.proc.pid)
    assert daemon.stop() == 0
    security_row("deep path (1000 components, ~2 KB)",
                 "forbidden_path (max_path_depth), for the file and lock_file_directory; daemon serves on",
                 "40 refusals, nothing created, daemon exit 0 on SIGTERM; "
                 f"honest client {honest.acked} records", lost, describe_resources(before, after))


def test_any_exception_becomes_an_error_reply_and_the_daemon_goes_on(start_daemon, raw_client, tmp_path,
                                                                    security_row):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAULTS_SITECUSTOMIZE)
    pythonpath = os.environ.get("PYTHONPATH")
    daemon = start_daemon(env={"PYTHONPATH": str(hooks) + (os.pathsep + pythonpath if pythonpath else "")})
    client = raw_client(daemon.endpoint, "attacker")
    logs = daemon.log_dir
    with HonestClient(daemon.endpoint, os.path.join(logs, "honest.log")) as honest:
        for n in range(10):
            reply = client.write(os.path.join(logs, "boom-main.log"), [seq_record("a", n)])
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_INTERNAL, reply
            assert reply.seq == client.seq  # the client knows which batch failed
            reply = client.write(os.path.join(logs, "boom-writer.log"), [seq_record("a", n)])
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_INTERNAL, reply
            reply = client.sync(os.path.join(logs, "boom-writer.log"), seq_record("s", n))
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_INTERNAL, reply
        honest.stop()
        lost = honest.lost()
    counters = daemon.stats()["daemon"]["counters"]
    assert counters["internal"] == 30
    code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.stderr()
    security_row("exception while handling a message (injected RecursionError / MemoryError)",
                 "an internal error reply naming the batch, a counter; the daemon keeps serving; exit codes keep "
                 "their meaning",
                 f"30 internal replies (main loop and writer thread), counter {counters['internal']}, "
                 f"exit code {code} on SIGTERM; honest client {honest.acked} records", lost)
