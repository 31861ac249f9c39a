"""Measurements for docs/forwarding.md (not a test): ``python tests/e2e/forwarding/measure.py intake|imfile``.

intake: the central rsyslogd's sustained intake from the lab's three hosts.
Each host's file is pre-filled with N records, then the three forwarders
start together; the rate is records at the central / wall time, and the
central's CPU seconds give records per central CPU-second (the machine's two
cores are shared with the forwarders, so the wall rate is a floor).

imfile: the alternative sender, rsyslog's imfile + omrelp on each host (a
generated per-host config, disk-assisted action queue), under gzip rotation
and a SIGKILL of the per-host rsyslogd, with the same oracle.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

E2E = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(E2E), E2E]  # tests/ for support, tests/e2e/ for forwarding

from support import seq_record, wait_for  # noqa: E402

from forwarding.netlab import RELP_PORT, Lab, enter  # noqa: E402


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prefill(path: str, writer: str, count: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for n in range(count):
            f.write(seq_record(writer, n, f"p{n}-" + "y" * (n % 50)) + "\n")


def intake(per_host: int, window: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        lab = Lab(root, forward={"window": window})
        try:
            lab.build()
            lab.start_central()
            for host in (1, 2, 3):
                prefill(lab.host_log(host), f"h{host}", per_host)
                lab.expected[f"h{host}"] = per_host
            cpu0 = cpu_seconds(lab.central.pid)
            t0 = time.monotonic()
            for host in (1, 2, 3):
                lab.start_host(host)
            total = 3 * per_host

            def count() -> int:
                with open(lab.central_log, "rb") as f:
                    return f.read().count(b"\n")

            wait_for(lambda: os.path.exists(lab.central_log) and count() >= total, 600, "all records")
            wall = time.monotonic() - t0
            cpu = cpu_seconds(lab.central.pid) - cpu0
            sender_cpu = sum(cpu_seconds(d.proc.pid) for d in lab.daemons.values())
            report = lab.central_report()
            print(f"intake window={window}: {total} records in {wall:.1f}s = {total / wall:,.0f} rec/s; "
                  f"central rsyslogd {cpu:.1f} CPU-s = {total / cpu:,.0f} rec/CPU-s; "
                  f"forwarders {sender_cpu:.1f} CPU-s = {total / sender_cpu:,.0f} rec/CPU-s; "
                  f"missing {report.missing_count}, duplicates {report.duplicates}")
        finally:
            lab.close()


HOST_IMFILE = """\
global(workDirectory="{work}")
module(load="imfile")
module(load="omrelp")
input(type="imfile" file="{log}" tag="app" reopenOnTruncate="on")
action(type="omrelp" target="10.213.{host}.1" port="{port}" template="RSYSLOG_SyslogProtocol23Format"
       queue.type="LinkedList" queue.filename="fwd" queue.saveOnShutdown="on" queue.checkpointInterval="1"
       queue.syncqueuefiles="on" action.resumeRetryCount="-1" action.resumeInterval="1")
"""


def imfile(records: int, kill: bool) -> None:
    """imfile+omrelp on host 1 under gzip rotation (100 KB), optionally SIGKILLing the host's rsyslogd."""
    with tempfile.TemporaryDirectory() as root:
        lab = Lab(root)
        host_rsyslog = None
        try:
            lab.build()
            lab.start_central()
            daemon = lab.start_host_without_forwarding(1)
            work = os.path.join(root, "host1", "rsyslog")
            os.makedirs(work, exist_ok=True)
            conf = os.path.join(work, "rsyslog.conf")
            with open(conf, "w") as f:
                f.write(HOST_IMFILE.format(work=work, log=lab.host_log(1), host=1, port=RELP_PORT))

            def start() -> subprocess.Popen:
                return subprocess.Popen(["rsyslogd", "-n", "-f", conf, "-i", os.path.join(work, "pid")],
                                        preexec_fn=enter(lab.host_ns[0]))

            host_rsyslog = start()
            lab.start_app(1, "h1a0", records, 1000, 100 * 1024)
            lab.start_app(1, "h1a1", records, 1000, 100 * 1024)
            if kill:
                wait_for(lambda: len(lab.central_records()) > records // 2, 60, "records at the central")
                host_rsyslog.kill()
                host_rsyslog.wait()
                time.sleep(2)  # the outage of the per-host sender, while rotation goes on
                host_rsyslog = start()
            lab.wait_apps()
            report = lab.wait_central_complete(timeout=30)
            print(f"imfile+omrelp, gzip rotation every 100 KB{', host rsyslogd SIGKILLed' if kill else ''}: "
                  f"{report.expected} records, {report.missing_count} missing, {report.duplicates} duplicates")
            del daemon
        finally:
            if host_rsyslog is not None and host_rsyslog.poll() is None:
                host_rsyslog.send_signal(signal.SIGTERM)
                host_rsyslog.wait(10)
            lab.close()


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "intake":
        for window in (256, 1024):
            intake(int(sys.argv[2]) if len(sys.argv) > 2 else 100_000, window)
    elif what == "imfile":
        imfile(5000, kill=False)
        imfile(5000, kill=True)
