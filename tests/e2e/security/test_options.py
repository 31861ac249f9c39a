"""Option policy, one file one set of options, honest acks, lock-file mode.

Each refusal names the option and the rule, creates nothing, is counted, and
an honest client writing at the same time loses nothing.
"""

import os
import stat

import pytest

from clh_writerd import protocol
from support import check_sequences, family_files, read_lines, seq_record

from .conftest import HonestClient, shared_log_dir

REFUSED = [
    # (options, option named in the reply, rule words, what)
    ({"chmod": 0o4755}, "chmod", "setuid", "chmod with setuid + execute bits"),
    ({"chmod": 0o2640}, "chmod", "setgid", "chmod with setgid"),
    ({"chmod": 0o1666}, "chmod", "sticky", "chmod with the sticky bit"),
    ({"chmod": 0o755}, "chmod", "execute", "chmod with execute bits"),
    ({"owner": ["root", "root"]}, "owner", "allow_owner", "owner while allow_owner = false"),
    ({"encoding": "latin-1"}, "encoding", "utf-8", "encoding latin-1 (arbitrary bytes)"),
    ({"encoding": "utf-16"}, "encoding", "utf-8", "encoding utf-16"),
    ({"terminator": "|"}, "terminator", "newline", "terminator without a newline"),
    ({"newline": "\r"}, "newline", "one of", "newline='\\r' (no line ends in \\n)"),
    ({"maxBytes": 1, "backupCount": 0}, "backupCount", "truncate", "maxBytes=1, backupCount=0 (truncates)"),
]


def test_option_policy_refusals_name_the_option_and_rule(start_daemon, raw_client, security_row):
    daemon = start_daemon()
    client = raw_client(daemon.endpoint, "attacker")
    observed = []
    with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest.log")) as honest:
        for n, (options, option, rule, what) in enumerate(REFUSED):
            path = os.path.join(daemon.log_dir, f"refused-{n}.log")
            reply = client.write(path, [seq_record("a", 0)], options)
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_BAD_OPTIONS, (options, reply)
            assert repr(option) in reply.message and rule in reply.message, reply.message
            assert not reply.retryable
            assert not os.path.exists(path), f"{what}: a file was created"
            sync = client.sync(path, seq_record("s", 0), options)
            assert isinstance(sync, protocol.Error) and sync.code == protocol.E_BAD_OPTIONS, sync
            observed.append(what)
        honest.stop()
        lost = honest.lost()
    assert daemon.stats()["daemon"]["counters"]["bad_options"] == 2 * len(REFUSED)
    security_row("option policy", "chmod s/g/t/x bits, owner (off), encodings outside utf-8/ascii, terminator "
                 "without \\n, newline='\\r', backupCount=0 with maxBytes: bad_options naming option and rule",
                 f"{len(REFUSED)} option sets refused (batch and sync), nothing created, bad_options counter "
                 f"{2 * len(REFUSED)}; honest client {honest.acked} records", lost)


def test_one_file_one_set_of_options_and_lossy_writes_are_never_acked(start_daemon, raw_client, security_row):
    daemon = start_daemon()
    first, second = raw_client(daemon.endpoint, "first"), raw_client(daemon.endpoint, "second")
    path = os.path.join(daemon.log_dir, "shared.log")
    acked = {"first": 0}
    with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest.log")) as honest:
        assert isinstance(first.write(path, [seq_record("first", i) for i in range(10)], {"maxBytes": 0}),
                          protocol.Ack)
        acked["first"] = 10
        for options in ({"maxBytes": 1, "backupCount": 5}, {"encoding": "ascii"}, {"use_gzip": True}):
            reply = second.write(path, [seq_record("second", 0)], options)
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_OPTIONS_CONFLICT, reply
            assert "differ" in reply.message
        # ascii + strict: a record the encoding cannot hold is refused, never acked.
        strict = os.path.join(daemon.log_dir, "ascii.log")
        options = {"encoding": "ascii", "unicode_error_policy": "strict"}
        reply = second.write(strict, [seq_record("second", 0), "SEQ second 1 Grüße"], options)
        assert isinstance(reply, protocol.Error) and reply.code == protocol.E_BAD_OPTIONS, reply
        # A batch far larger than maxBytes * backupCount: rotation would delete
        # what the same write put in the file, so it is not acknowledged.
        tiny = os.path.join(daemon.log_dir, "tiny.log")
        big = [seq_record("big", i, "y" * 200) for i in range(200)]
        reply = second.write(tiny, big, {"maxBytes": 300, "backupCount": 1})
        assert isinstance(reply, protocol.Error) and reply.code == protocol.E_BAD_OPTIONS, reply
        assert "backupCount" in reply.message
        honest.stop()
        lost = honest.lost()
    check_sequences(read_lines(path), acked).assert_complete()
    counters = daemon.stats()["daemon"]["counters"]
    assert counters["options_conflict"] == 3
    assert counters["bad_options"] >= 2
    security_row("options conflict / lossy options",
                 "other options for a served file: options_conflict; encoding error or rotation deleting the "
                 "batch: error reply, never an ack",
                 "3 conflicting declarations refused (options_conflict), ascii/strict and "
                 "maxBytes*backupCount overflow answered bad_options; acked <= written on every file; "
                 f"honest client {honest.acked} records", lost)


@pytest.mark.parametrize("chmod", [None, 0o640])
def test_lock_file_gets_the_log_files_mode(chmod, start_daemon, raw_client, attacker, base_dir, security_row):
    daemon = start_daemon(workdir=base_dir, log_dir=shared_log_dir(os.path.join(base_dir, "logs")))
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "app.log")
    options = {} if chmod is None else {"chmod": chmod}
    with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest.log")) as honest:
        assert isinstance(client.write(path, [seq_record("a", 0)], options), protocol.Ack)
        honest.stop()
        lost = honest.lost()
    lock = os.path.join(daemon.log_dir, ".__app.lock")
    log_mode = stat.S_IMODE(os.stat(path).st_mode)
    lock_mode = stat.S_IMODE(os.stat(lock).st_mode)
    assert lock_mode == log_mode, (oct(lock_mode), oct(log_mode))
    assert not lock_mode & 0o111
    if chmod == 0o640:
        # Another user can no longer open it, so cannot hold a shared flock on it.
        def hold():
            with open(lock):
                pass
        with pytest.raises(AssertionError):
            attacker.run(hold)
    security_row(f"lock file mode (chmod={oct(chmod) if chmod else 'unset'})",
                 "the lock file is created with the log file's mode (not world-readable unless the log is)",
                 f"log {oct(log_mode)}, lock {oct(lock_mode)}"
                 + ("; another user cannot open it (no shared flock)" if chmod else ""), lost)
    assert family_files(path) == [path]
