"""Faults (issue 5): the daemon killed, killed while compressing, out of disk,
without permission, stopped under load; client processes killed.

Every scenario runs a real ``clh-writerd`` subprocess and real client
processes (tests.e2e.client.test_delivery's ``Load``: fork children logging
sequence records through ``create_nonblocking_handler`` into small,
gzip-rotating files). The oracle then reads every file of the family
(rotated, .gz, orphaned .rotate.*): nothing may be missing, no line torn,
and duplicates may only come from batches the clients report as written
again (``resent``) or sync records that timed out (``sync_timeouts``).
"""

import ctypes
import os
import random
import resource
import signal
import time
from typing import Any, Dict, List

import pytest
from support import (
    OracleReport,
    check_sequences,
    family_files,
    read_lines,
    seq_record,
    set_aside_interrupted_gzips,
    wait_for,
)
from support.clients import (
    CHILD_TIMEOUT,
    Load,
    daemon_has_written,
    exact_messages,
    join_children,
    load_results,
    report_duplicates,
    stop_daemon,
)

from clh_writerd import protocol
from clh_writerd.client.control import request
from tests.e2e.client import workers

pytestmark = pytest.mark.guarantee


# -- helpers ------------------------------------------------------------------
def oracle(path: str, results: Dict[str, Dict[str, Any]], aside: str) -> OracleReport:
    """check_family without its "must have rotated" check, after setting aside
    .gz files a killed daemon left half-written (their source is read instead)."""
    set_aside_interrupted_gzips(path, aside)
    messages, malformed = exact_messages(read_lines(path), results)
    report = check_sequences(messages, {w: r["count"] for w, r in results.items()})
    report.torn.extend(malformed)
    return report


def duplicate_budget(results: Dict[str, Dict[str, Any]]) -> int:
    """What the clients say they may have written twice."""
    return sum(r["stats"]["resent"] + r["stats"]["sync_timeouts"] for r in results.values())


def assert_accounted(name: str, report: OracleReport, results: Dict[str, Dict[str, Any]]) -> None:
    report_duplicates(name, report, results)
    report.assert_complete(allow_duplicates=True)
    assert report.duplicates <= duplicate_budget(results), "duplicates not accounted for by resent + sync_timeouts"


def gzipped(path: str) -> int:
    return sum(name.endswith(".gz") for name in family_files(path))


def pinged(endpoint: str) -> bool:
    return isinstance(request(endpoint, protocol.encode_ping(), 5.0), protocol.Ok)


# -- 1. repeated SIGKILL ----------------------------------------------------------
KILLS = 10
SEED = 20240605


def test_repeated_sigkill_under_load_nothing_missing(start_daemon, tmp_path, guarantee):
    rng = random.Random(SEED)
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "app.log")
    pids, busy_kills = set(), 0
    with Load(tmp_path, path, {"endpoint": daemon.endpoint}, processes=8) as load:
        load.wait_each_logged(1000)
        for kill in range(KILLS):
            assert daemon.proc is not None
            pids.add(daemon.proc.pid)
            # A random moment of the daemon's life, from just after its
            # start (clients not back yet) to deep into serving them; the
            # fault's timing is the scenario's input, not a synchronisation.
            time.sleep(rng.uniform(0.05, 1.5))
            if kill % 2 == 0:
                # Every other kill hits a daemon that is writing for the clients:
                # how soon they come back from their fallback depends on the
                # machine's load, and the scenario needs both kinds of kill.
                wait_for(lambda: daemon_has_written(daemon, path), what="clients to return to the restarted daemon")
            busy_kills += daemon_has_written(daemon, path)
            daemon.kill()
            load.wait_each_logged(200, since=load.counts(), what="clients to keep logging with the daemon dead")
            daemon.start()
        wait_for(lambda: daemon_has_written(daemon, path), what="clients to return to the restarted daemon")
        load.wait_each_logged(1000, since=load.counts())
        results = load.finish()
    stop_daemon(daemon)

    report = oracle(path, results, str(tmp_path / "aside"))
    guarantee("1. Repeated SIGKILL",
              f"daemon SIGKILLed {KILLS} times at random moments (seed {SEED}) and restarted, "
              "8 processes logging, maxBytes 200 KiB + gzip",
              report.expected, report.missing_count, report.duplicates,
              note=f"{busy_kills} kills hit a daemon serving clients, {gzipped(path)} .gz files")
    assert len(pids) == KILLS
    assert gzipped(path) > 0
    assert_accounted("10 x sigkill", report, results)


# -- 2. SIGKILL while compressing ------------------------------------------------
BIG_MAX_BYTES = 16 * 1024 * 1024


def test_sigkill_while_compressing_a_rotated_file_nothing_missing(start_daemon, tmp_path, guarantee):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "app.log")
    os.makedirs(daemon.log_dir, exist_ok=True)
    # Earlier records (writer "pre", as a process with pid 0 would have logged
    # them) fill the file to just under maxBytes: the clients' first records
    # make the daemon roll it over. gzip (level 9) of 16 MiB of these lines
    # takes seconds, a window the test cannot miss.
    pre: Dict[str, Any] = {"writer": "pre", "pid": 0, "errors": [],
                           "stats": {"resent": 0, "sync_timeouts": 0, "fallback_written": 0}}
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while f.tell() < BIG_MAX_BYTES - 256 * 1024:
            f.write(workers.render_line("INFO", "pre", 0, n) + "\n")
            n += 1
    pre["count"] = n

    def compressing() -> List[str]:
        return [name for name in os.listdir(daemon.log_dir) if ".rotate." in name and name.endswith(".gz")]

    kwargs = {"endpoint": daemon.endpoint, "maxBytes": BIG_MAX_BYTES}
    with Load(tmp_path, path, kwargs, processes=4) as load:
        gz = wait_for(compressing, what="the daemon to start compressing", interval=0.002)
        daemon.kill()
        source = os.path.join(daemon.log_dir, gz[0][:-len(".gz")])
        assert os.path.exists(source), "compression finished before the kill"
        load.wait_each_logged(1000, since=load.counts(), what="clients to keep logging with the daemon dead")
        daemon.start()
        wait_for(lambda: daemon_has_written(daemon, path), what="clients to return to the restarted daemon")
        load.wait_each_logged(1000, since=load.counts())
        results = load.finish()
    stop_daemon(daemon)

    results["pre"] = pre
    orphans = [name for name in family_files(path) if ".rotate." in name]
    interrupted = set_aside_interrupted_gzips(path, str(tmp_path / "aside"))
    report = oracle(path, results, str(tmp_path / "aside"))
    guarantee("2. SIGKILL while compressing",
              "daemon SIGKILLed while gzipping a 16 MiB rotated file, restarted; 4 processes logging",
              report.expected, report.missing_count, report.duplicates,
              note="CLH leaves the orphan .rotate.* source (read by the oracle) and a truncated .gz")
    assert [os.path.basename(p) for p in orphans] == sorted([os.path.basename(source), gz[0]]), orphans
    assert [os.path.basename(p) for p in interrupted] == gz
    assert_accounted("sigkill while compressing", report, results)


# -- 3. disk full ----------------------------------------------------------------------
# The daemon may not write beyond this offset in any file (RLIMIT_FSIZE): its
# writes fail once the log file is this large, while the clients' own writes
# (fallback) are not limited, as if only the daemon's view of the disk were
# full. Below workers.MAX_BYTES, so the file fills up before it would rotate.
FSIZE_LIMIT = 64 * 1024


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
    # A write beyond the limit then fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_disk_full_daemon_acks_nothing_unwritten_then_space_returns(start_daemon, tmp_path, guarantee):
    full = start_daemon(preexec_fn=limit_file_size)
    path = os.path.join(full.log_dir, "app.log")
    with Load(tmp_path, path, {"endpoint": full.endpoint}, processes=4) as load:
        wait_for(lambda: daemon_has_written(full, path), what="the daemon to write records")
        wait_for(lambda: full.file_stats(path)["write_errors"] >= 3, what="the daemon's writes to fail")
        load.wait_each_logged(2000, since=load.counts(), what="clients to log while the disk is full")
        file_stats = full.file_stats(path)
        stop_daemon(full)
        # Space returns: a daemon without the limit, on the same endpoint.
        os.makedirs(tmp_path / "space")
        daemon = start_daemon(workdir=str(tmp_path / "space"), log_dir=full.log_dir, endpoint=full.endpoint)
        wait_for(lambda: daemon_has_written(daemon, path), what="clients to return to the daemon")
        load.wait_each_logged(2000, since=load.counts())
        results = load.finish()
    received = {c["pid"]: c["records_received"] for c in daemon.stats()["clients"]}
    after = daemon.file_stats(path)
    stop_daemon(daemon)

    report = oracle(path, results, str(tmp_path / "aside"))
    guarantee("3. Disk full",
              f"the daemon's writes fail beyond {FSIZE_LIMIT // 1024} KiB (RLIMIT_FSIZE) under load from 4 "
              "processes; then a daemon without the limit",
              report.expected, report.missing_count, report.duplicates,
              note=f"{file_stats['write_errors']} failed daemon writes, "
                   f"{sum(r['stats']['fallback_written'] for r in results.values())} records by the fallback")
    assert "File too large" in file_stats["last_error"], file_stats
    assert file_stats["records_written"] > 0, file_stats
    assert all(r["stats"]["fallback_written"] > 0 for r in results.values()), "every client kept its records"
    # Space returned: every client went back to the daemon, which wrote without error.
    assert all(received.get(r["pid"], 0) > 0 for r in results.values()), received
    assert after["write_errors"] == 0 and after["records_written"] > 0, after
    assert_accounted("disk full", report, results)


# -- 4. no permission ----------------------------------------------------------------
OTHER_UID = 65534  # nobody
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
PR_CAPBSET_DROP = 24
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def _libc_call(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), what)


def without_root_file_powers() -> None:
    """The daemon runs as root, but may not bypass file permissions: it is
    refused what another user owns. (An unprivileged uid cannot even start
    the daemon here: this Python lives under /root, mode 0700.) Dropped from
    the bounding set, the capabilities are gone after exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        _libc_call(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "prctl(PR_CAPBSET_DROP)")


def read_only_for_the_daemon(directory: str):
    """A preexec_fn: in a mount namespace of its own, the daemon sees
    ``directory`` bind-mounted read-only; every other process writes it as usual."""
    target = directory.encode()

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        _libc_call(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _libc_call(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount(MS_PRIVATE)")
        _libc_call(libc.mount(target, target, None, MS_BIND, None), "mount(MS_BIND)")
        _libc_call(libc.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), "mount(MS_RDONLY)")

    return preexec


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespace, files of another user)")
@pytest.mark.parametrize("obstacle", ["directory", "lock-file"])
def test_no_permission_clear_error_and_fallback_keeps_every_record(start_daemon, raw_client, tmp_path,
                                                                    guarantee, obstacle):
    log_dir = str(tmp_path / "logs")
    os.makedirs(log_dir)
    path = os.path.join(log_dir, "app.log")
    if obstacle == "directory":
        preexec, denied = read_only_for_the_daemon(log_dir), "Read-only file system"
        what = "log directory read-only for the daemon (its own mount namespace)"
    else:
        lock_path = os.path.join(log_dir, ".__app.lock")  # CLH's lock file of app.log
        with open(lock_path, "w"):
            pass
        os.chmod(lock_path, 0o600)
        os.chown(lock_path, OTHER_UID, OTHER_UID)
        preexec, denied = without_root_file_powers, "Permission denied"
        what = "the file's lock file owned by another user (0600)"
    daemon = start_daemon(log_dir=log_dir, preexec_fn=preexec)

    # Clients as root: their own (fallback) writes are allowed.
    with Load(tmp_path, path, {"endpoint": daemon.endpoint}, processes=4) as load:
        load.wait_each_logged(3000)
        wait_for(lambda: daemon.file_stats(path)["write_errors"] > 0, what="the daemon to fail a write")
        results = load.finish()
    file_stats = daemon.file_stats(path)
    # The reply names the code and the cause (the file's own options: no conflict).
    reply = raw_client(daemon.endpoint).write(path, [seq_record("raw", 0)], file_stats["options"])
    stop_daemon(daemon)

    report = oracle(path, results, str(tmp_path / "aside"))
    guarantee(f"4. No permission ({obstacle})", what + "; 4 processes logging as root",
              report.expected, report.missing_count, report.duplicates,
              note=f"write_failed replies, {file_stats['write_errors']} write errors in stats; "
                   "every record written by the clients' fallback")
    assert isinstance(reply, protocol.Error) and reply.code == protocol.E_WRITE_FAILED, reply
    assert denied in reply.message and log_dir in reply.message, reply.message
    assert denied in file_stats["last_error"] and file_stats["records_written"] == 0, file_stats
    for writer, result in results.items():
        s = result["stats"]
        assert s["acked"] == 0 and s["fallback_written"] == result["count"], (writer, s)
        assert protocol.E_WRITE_FAILED in s["last_error"] and denied in s["last_error"], (writer, s)
    report.assert_complete()


# -- 6. SIGTERM under load -------------------------------------------------------
def test_sigterm_under_load_drains_nothing_missing_no_duplicates(start_daemon, tmp_path, guarantee):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "app.log")
    with Load(tmp_path, path, {"endpoint": daemon.endpoint}, processes=8) as load:
        load.wait_each_logged(2000)
        wait_for(lambda: daemon_has_written(daemon, path), what="the daemon to write records")
        stop_daemon(daemon)  # asserts the drain finished (exit code 0)
        load.wait_each_logged(1000, since=load.counts(), what="clients to keep logging after the daemon left")
        daemon.start()
        wait_for(lambda: daemon_has_written(daemon, path), what="clients to return to the restarted daemon")
        load.wait_each_logged(1000, since=load.counts())
        results = load.finish()
    stop_daemon(daemon)

    report = oracle(path, results, str(tmp_path / "aside"))
    guarantee("6. SIGTERM under load",
              "daemon stopped (SIGTERM, drained) under load from 8 processes, then started again",
              report.expected, report.missing_count, report.duplicates)
    report_duplicates("sigterm + restart", report, results)
    assert "stopping: draining" in daemon.stderr()
    assert all(r["stats"]["fallback_written"] > 0 for r in results.values())
    report.assert_complete()  # no duplicates either


# -- 7. client processes SIGKILLed ------------------------------------------------
KILLED = 3


def highest_number(path: str, writer: str) -> int:
    """The highest record number of ``writer`` in the family, -1 if none."""
    prefix = f"SEQ {writer} "
    found = [int(line.split(prefix, 1)[1].split(" ", 1)[0]) for line in read_lines(path) if prefix in line]
    return max(found, default=-1)


def eventually_stable(read, interval: float = 0.3, timeout: float = 10.0):
    """``read()`` once two reads ``interval`` apart agree."""
    deadline = time.monotonic() + timeout
    last = read()
    while True:
        time.sleep(interval)  # the interval is the thing measured: no change over it
        now = read()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def test_killed_client_processes_lose_only_what_they_had_not_handed_over(start_daemon, raw_client, tmp_path,
                                                                          guarantee):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "app.log")
    # Nothing but the kills fails here: patient timeouts keep every client on
    # the daemon, and a queue that never fills keeps every record on the
    # queued path (a record that finds the queue full, or one at sync level,
    # is written ahead of the queue and may outlive queued ones).
    kwargs = {"endpoint": daemon.endpoint, "queue_size": 1_000_000, "connect_timeout": 20.0,
              "ack_timeout": 60.0, "sync_timeout": 60.0, "drain_timeout": 60.0}
    with Load(tmp_path, path, kwargs, processes=8) as load:
        load.wait_each_logged(2000)
        wait_for(lambda: daemon_has_written(daemon, path), what="the daemon to write records")
        killed = load.procs[:KILLED]
        for proc in killed:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in killed:
            proc.join(CHILD_TIMEOUT)
            assert proc.exitcode == -signal.SIGKILL
        killed_at = load.counts()
        # What the daemon received from the killed processes, once it stopped
        # growing (their last frames read), before their entries leave the
        # stats (a client whose process is gone is folded 10 s after it was
        # last seen).
        received = eventually_stable(lambda: {c["pid"]: c["records_received"] for c in daemon.stats()["clients"]
                                              if c["pid"] in {p.pid for p in killed}})
        survivors = range(KILLED, len(load.procs))
        wait_for(lambda: all(load.progress[i] >= killed_at[i] + 2000 for i in survivors), CHILD_TIMEOUT,
                 "the other clients to keep logging", interval=0.02)
        # The daemon is healthy: it answers, reports, and takes a new client's batch.
        assert pinged(daemon.endpoint)
        probe = os.path.join(daemon.log_dir, "probe.log")
        assert isinstance(raw_client(daemon.endpoint).write(probe, [seq_record("probe", 0)]), protocol.Ack)
        load.stop_event.set()
        join_children([load.procs[i] for i in survivors])
        results = load_results([load.result_paths[i] for i in survivors])
    stop_daemon(daemon)

    # A killed process's records must be a prefix of what it logged: expect
    # every number up to the highest one found, and none may be missing.
    expected = dict(results)
    lost = 0
    for i, proc in enumerate(killed):
        writer = load.writers[i]
        expected[writer] = {"writer": writer, "pid": proc.pid, "errors": [], "count": highest_number(path, writer) + 1}
        lost += max(0, killed_at[i] - expected[writer]["count"])  # a lower bound: it may have logged a few more
    report = oracle(path, expected, str(tmp_path / "aside"))
    guarantee("7. Client processes SIGKILLed",
              f"{KILLED} of 8 client processes SIGKILLed mid-run; the others finish",
              report.expected, report.missing_count, report.duplicates,
              note=f"the killed processes' records count up to their last one in the file, which holds "
                   f"everything the daemon received from them; at least {lost} were still in their memory")
    report.assert_complete()
    for i, proc in enumerate(killed):
        writer = load.writers[i]
        # Everything the daemon received from the killed process is in the file.
        assert expected[writer]["count"] == received[proc.pid] > 0, (writer, expected[writer], received[proc.pid])
    for writer, result in results.items():
        s = result["stats"]
        assert result["drained"] and s["acked"] == result["count"] and s["fallback_written"] == 0, (writer, s)
