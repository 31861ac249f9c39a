"""Client processes the delivery and fault tests start: running and joining
them, reading their results, and checking each line byte for byte against
the record its process logged."""

import multiprocessing
import re
import signal
from typing import Any, Dict, List, Sequence, Tuple

from tests.e2e.client import workers

from .oracle import OracleReport, check_sequences, family_files, ordered_family, per_writer_order, read_lines
from .processes import wait_for

# Children get this long to finish; generous, the machine is shared.
CHILD_TIMEOUT = 120.0

LINE_RE = re.compile(r"^(INFO|ERROR) delivery\.(\S+) (\d+): (SEQ (\S+) (\d+) .*)$")


# -- helpers ------------------------------------------------------------------
def run_children(procs: Sequence[multiprocessing.process.BaseProcess], timeout: float = CHILD_TIMEOUT) -> None:
    for proc in procs:
        proc.start()
    join_children(procs, timeout)


def join_children(procs: Sequence[multiprocessing.process.BaseProcess], timeout: float = CHILD_TIMEOUT) -> None:
    wait_for(lambda: all(p.exitcode is not None for p in procs), timeout, "the client processes to exit",
             interval=0.05)
    for proc in procs:
        proc.join()
    assert [p.exitcode for p in procs] == [0] * len(procs), "a client process failed"


def load_results(paths: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    results = {}
    for path in paths:
        result = workers.read_result(path)
        results[result["writer"]] = result
    return results


def exact_messages(lines: Sequence[str], results: Dict[str, Dict[str, Any]]) -> Tuple[List[str], List[str]]:
    """(messages, malformed): each line must be byte for byte what FORMAT makes
    of the record it carries, logged by the process that logged it."""
    messages, malformed = [], []
    errors = {w: set(r.get("errors", ())) for w, r in results.items()}
    for line in lines:
        m = LINE_RE.match(line)
        result = results.get(m.group(5)) if m else None
        if m is None or result is None:
            malformed.append(line)
            continue
        writer, n = m.group(5), int(m.group(6))
        level = "ERROR" if n in errors[writer] else "INFO"
        if line != workers.render_line(level, writer, result["pid"], n):
            malformed.append(line)
            continue
        messages.append(m.group(4))
    return messages, malformed


def check_family(path: str, results: Dict[str, Dict[str, Any]]) -> OracleReport:
    """The oracle over every file of the family; malformed lines count as torn."""
    names = family_files(path)
    assert any(name.endswith(".gz") for name in names), f"the file should have rotated (gzipped): {names}"
    messages, malformed = exact_messages(read_lines(path), results)
    report = check_sequences(messages, {w: r["count"] for w, r in results.items()})
    report.torn.extend(malformed)
    return report


class OrderBroken(AssertionError):
    """Some process's records are not in the file in the order it emitted them."""


def check_order(path: str, results: Dict[str, Dict[str, Any]]) -> None:
    """Per-process order over the family read oldest file first."""
    messages, malformed = exact_messages(ordered_family(path), results)
    assert not malformed
    order = per_writer_order(messages)
    assert set(order) == set(results)
    broken = sorted(w for w, ok in order.items() if not ok)
    if broken:
        raise OrderBroken(f"emit order broken for {broken}")


def total_resent(results: Dict[str, Dict[str, Any]]) -> int:
    return sum(r["stats"]["resent"] for r in results.values())


class StopFlag:
    """Tells client processes to stop; they poll it once per record.

    Not ``multiprocessing.Event``: its ``is_set()`` takes a lock, and a
    client SIGKILLed while holding it leaves it held, so the next ``set()``
    waits forever (CI: the soak test hung in ``Clients.finish``). A shared
    byte needs no lock."""

    def __init__(self, ctx: Any) -> None:
        self._flag = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)


class Load:
    """N fork processes logging paced records until told to stop."""

    def __init__(self, tmp_path, path: str, handler_kwargs: Dict[str, Any], processes: int = 8) -> None:
        self.ctx = multiprocessing.get_context("fork")
        self.writers = [f"w{i}" for i in range(processes)]
        self.progress = self.ctx.Array("q", processes, lock=False)
        self.stop_event = StopFlag(self.ctx)
        self.result_paths = [str(tmp_path / f"{w}.json") for w in self.writers]
        self.procs = [
            self.ctx.Process(target=workers.log_until, name=f"client-{w}",
                             args=(w, path, handler_kwargs, rp, self.progress, i, self.stop_event))
            for i, (w, rp) in enumerate(zip(self.writers, self.result_paths))
        ]

    def __enter__(self) -> "Load":
        for proc in self.procs:
            proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for proc in self.procs:
            proc.join(CHILD_TIMEOUT)
            if proc.exitcode is None:
                proc.kill()
                proc.join()

    def counts(self) -> List[int]:
        return list(self.progress)

    def wait_each_logged(self, more: int, since: Sequence[int] = (), what: str = "") -> List[int]:
        """Wait until every process logged ``more`` records past ``since``."""
        base = list(since) or [0] * len(self.writers)
        wait_for(lambda: all(now >= b + more for now, b in zip(self.progress, base)), CHILD_TIMEOUT,
                 what or f"every client to log {more} more records", interval=0.02)
        return self.counts()

    def finish(self) -> Dict[str, Dict[str, Any]]:
        self.stop_event.set()
        join_children(self.procs)
        return load_results(self.result_paths)


def daemon_has_written(daemon, path: str) -> bool:
    try:
        return daemon.file_stats(path)["records_written"] > 0
    except KeyError:
        return False


def stop_daemon(daemon) -> None:
    """SIGTERM: the daemon writes what it still holds (batches a client may
    have given up on, too) and exits, so the files are final before the
    oracle reads them."""
    assert daemon.stop(signal.SIGTERM) == 0, daemon.stderr()


def report_duplicates(name: str, report: OracleReport, results: Dict[str, Dict[str, Any]]) -> None:
    resent = total_resent(results)
    sync_timeouts = sum(r["stats"]["sync_timeouts"] for r in results.values())
    fallback = sum(r["stats"]["fallback_written"] for r in results.values())
    print(f"\n[{name}] records={report.expected} duplicates={report.duplicates} resent={resent} "
          f"sync_timeouts={sync_timeouts} fallback_written={fallback}")
