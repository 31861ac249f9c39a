"""Three "hosts" and a central rsyslogd, each in its own network namespace.

The lab creates namespaces ``<prefix>c`` (central) and ``<prefix>1..3`` and a
veth pair from each host to the central: host i is 10.213.i.2/24, the central
end 10.213.i.1/24. These addresses exist only inside the lab's namespaces, so
no forwarded byte can leave them. Processes enter a namespace with setns(2)
in preexec_fn, so the Popen pid is the process itself (SIGKILL hits it, not
an ``ip netns exec`` wrapper).

Every host runs a real clh-writerd with a ``[forward]`` section (the
forwarder thread) and real application processes (tests/e2e/forwarding/app.py).
The central runs the configuration ``clh-writerd forward-config rsyslog``
prints.
"""

import ctypes
import os
import signal
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

from support import DaemonProcess, OracleReport, check_sequences, free_tcp_port, read_lines, wait_for, write_config

CLONE_NEWNET = 0x40000000
RELP_PORT = 2514
APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")


def run(*cmd: str) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result.stdout


def enter(namespace: str) -> Callable[[], None]:
    """A preexec_fn that moves the child into ``namespace``'s network stack."""
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {namespace}")
        os.close(fd)
    return preexec


class LoopbackCentral:
    """The central rsyslogd on 127.0.0.1 and a free port, for single-host tests."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.extra_args: List[str] = []  # more `forward-config rsyslog` options (e.g. --tls)
        self.output = ""  # --output other than the single central.log
        self.port = free_tcp_port()
        self.log = os.path.join(directory, "central.log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "LoopbackCentral":
        os.makedirs(self.directory, exist_ok=True)
        conf = os.path.join(self.directory, "rsyslog.conf")
        with open(conf, "w") as f:
            f.write(run(sys.executable, "-m", "clh_writerd", "forward-config", "rsyslog", "--port", str(self.port),
                        "--address", "127.0.0.1", "--output", self.output or self.log, "--work-dir", self.directory,
                        *self.extra_args))
        out = open(os.path.join(self.directory, "rsyslogd.out"), "ab")
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", conf, "-i", os.path.join(self.directory, "pid")],
                                     stdout=out, stderr=out)
        out.close()

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited with {self.proc.returncode}")
            return f"127.0.0.1:{self.port} " in run("ss", "-Hltn")

        wait_for(listening, 20, "rsyslogd to listen")
        return self

    def lines(self) -> List[str]:
        """The forwarded lines (the record itself, without host/file/id)."""
        try:
            with open(self.log, "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        return [line.split(" ", 3)[-1] for line in data.split("\n")[:-1]]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def freeze(self) -> None:
        """SIGSTOP, and wait until every thread is stopped (delivery is asynchronous)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        task_dir = f"/proc/{self.proc.pid}/task"

        def stopped() -> bool:
            for tid in os.listdir(task_dir):
                with open(f"{task_dir}/{tid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                        return False
            return True

        wait_for(stopped, 10, "rsyslogd to stop")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Lab:
    """Namespaces, the central rsyslogd, per-host daemons and apps; close() removes all of it."""

    def __init__(self, root: str, hosts: int = 3, forward: Optional[Dict] = None) -> None:
        self.root = root
        self.prefix = f"clf{os.getpid() % 100000}x"
        self.central_ns = self.prefix + "c"
        self.host_ns = [f"{self.prefix}{i}" for i in range(1, hosts + 1)]
        self.forward = dict(window=256, checkpoint_interval=0.2, timeout=3.0)
        self.forward.update(forward or {})
        self.central_dir = os.path.join(root, "central")
        self.central_log = os.path.join(self.central_dir, "central.log")
        self.central: Optional[subprocess.Popen] = None
        self.daemons: Dict[int, DaemonProcess] = {}
        self.apps: List[subprocess.Popen] = []
        self.expected: Dict[str, int] = {}
        self.central_args: List[str] = []  # more `forward-config rsyslog` options
        self.host_forward: Dict[int, Dict] = {}  # per-host [forward] options over ``forward``
        self._namespaces: List[str] = []

    # -- network ---------------------------------------------------------------
    def build(self) -> "Lab":
        run("ip", "netns", "add", self.central_ns)
        self._namespaces.append(self.central_ns)
        run("ip", "-n", self.central_ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.host_ns, 1):
            run("ip", "netns", "add", ns)
            self._namespaces.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            host_if, central_if = f"{self.prefix}h{i}", f"{self.prefix}p{i}"
            run("ip", "-n", ns, "link", "add", host_if, "type", "veth", "peer", "name", central_if,
                "netns", self.central_ns)
            run("ip", "-n", ns, "addr", "add", f"10.213.{i}.2/24", "dev", host_if)
            run("ip", "-n", self.central_ns, "addr", "add", f"10.213.{i}.1/24", "dev", central_if)
            run("ip", "-n", ns, "link", "set", host_if, "up")
            run("ip", "-n", self.central_ns, "link", "set", central_if, "up")
        return self

    def link(self, host: int, up: bool) -> None:
        """Take host's link down (or up again), as a pulled cable would."""
        run("ip", "-n", self.host_ns[host - 1], "link", "set", f"{self.prefix}h{host}", "up" if up else "down")

    # -- central ---------------------------------------------------------------
    def start_central(self) -> None:
        """The central rsyslogd with the generated config (plus ``central_args``, e.g. --tls)."""
        os.makedirs(self.central_dir, exist_ok=True)
        conf = os.path.join(self.central_dir, "rsyslog.conf")
        text = run(sys.executable, "-m", "clh_writerd", "forward-config", "rsyslog", "--port", str(RELP_PORT),
                   "--output", self.central_log, "--work-dir", self.central_dir, *self.central_args)
        with open(conf, "w") as f:
            f.write(text)
        out = open(os.path.join(self.central_dir, "rsyslogd.out"), "ab")
        self.central = subprocess.Popen(
            ["rsyslogd", "-n", "-f", conf, "-i", os.path.join(self.central_dir, "rsyslogd.pid")],
            stdout=out, stderr=out, preexec_fn=enter(self.central_ns))
        out.close()

        def listening() -> bool:
            assert self.central is not None
            if self.central.poll() is not None:
                raise AssertionError(f"rsyslogd exited with {self.central.returncode}")
            return f":{RELP_PORT}" in run("ip", "netns", "exec", self.central_ns, "ss", "-Hltn")

        wait_for(listening, 20, "the central rsyslogd to listen")

    def kill_central(self) -> None:
        assert self.central is not None
        self.central.kill()
        self.central.wait(10)

    # -- hosts -----------------------------------------------------------------
    def host_dir(self, host: int) -> str:
        return os.path.join(self.root, f"host{host}")

    def host_log(self, host: int) -> str:
        return os.path.join(self.host_dir(host), "logs", "app.log")

    def start_host(self, host: int) -> DaemonProcess:
        """The host's clh-writerd with its forwarder; a restart reuses the same config and checkpoint."""
        daemon = self.daemons.get(host)
        if daemon is None:
            workdir = self.host_dir(host)
            os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
            daemon = DaemonProcess(workdir, preexec_fn=enter(self.host_ns[host - 1]))
            forward = {"target": f"10.213.{host}.1:{RELP_PORT}", "paths": [os.path.join(daemon.log_dir, "*.log")],
                       "state_file": os.path.join(workdir, "forward.json"), "hostname": f"h{host}",
                       **self.forward, **self.host_forward.get(host, {})}
            write_config(daemon.config_path, {
                "daemon": {"endpoint": daemon.endpoint, "allowed_dirs": [daemon.log_dir], "drain_timeout": 10.0},
                "forward": forward})
            self.daemons[host] = daemon
        return daemon.start()

    def start_host_without_forwarding(self, host: int) -> DaemonProcess:
        """The host's clh-writerd alone (another sender reads its files)."""
        workdir = self.host_dir(host)
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
        daemon = self.daemons[host] = DaemonProcess(workdir, preexec_fn=enter(self.host_ns[host - 1]))
        return daemon.start()

    def start_app(self, host: int, writer: str, count: int, rate: float, max_bytes: int = 10 * 1024 * 1024,
                  backups: int = 1000) -> None:
        """An app process in host's namespace logging ``count`` records at ``rate``/s (gzip, ``backups``)."""
        daemon = self.daemons[host]
        self.expected[writer] = count
        self.apps.append(subprocess.Popen(
            [sys.executable, APP, daemon.endpoint, self.host_log(host), writer, str(count), str(rate), str(max_bytes),
             str(backups)], cwd=self.host_dir(host), preexec_fn=enter(self.host_ns[host - 1])))

    def wait_apps(self, timeout: float = 120) -> None:
        for app in self.apps:
            assert app.wait(timeout) == 0, f"app exited with {app.returncode}"

    # -- the oracle ------------------------------------------------------------
    def central_records(self) -> List[Tuple[str, str, str, str]]:
        """(host, file, record id, line) of every line the central wrote."""
        try:
            with open(self.central_log, "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        out = []
        for line in data.split("\n")[:-1]:
            parts = line.split(" ", 3)
            out.append(tuple(parts) if len(parts) == 4 else ("", "", "", line))  # type: ignore[arg-type]
        return out

    def central_report(self) -> OracleReport:
        return check_sequences([r[3] for r in self.central_records()], self.expected, payloads=False)

    def local_report(self) -> OracleReport:
        lines: List[str] = []
        for host in self.daemons:
            lines += read_lines(self.host_log(host))
        return check_sequences(lines, self.expected, payloads=False)

    def wait_central_complete(self, timeout: float = 60) -> OracleReport:
        """Wait until the central holds every expected record; return the final report."""
        def complete() -> bool:
            return self.central_report().missing_count == 0

        try:
            wait_for(complete, timeout, "every record at the central")
        except AssertionError:
            pass  # the caller's assertion shows what is missing
        return self.central_report()

    def forward_stats(self, host: int) -> Dict:
        return self.daemons[host].stats()["forward"]

    # -- cleanup ---------------------------------------------------------------
    def close(self) -> None:
        for app in self.apps:
            if app.poll() is None:
                app.kill()
                app.wait(10)
        for daemon in self.daemons.values():
            daemon.cleanup()
        if self.central is not None and self.central.poll() is None:
            self.central.send_signal(signal.SIGTERM)
            try:
                self.central.wait(10)
            except subprocess.TimeoutExpired:
                self.central.kill()
                self.central.wait(5)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._namespaces = []
