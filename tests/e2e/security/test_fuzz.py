"""Property: whatever paths and options clients send, the daemon stays up,
answers ping, writes nothing outside allowed_dirs, and never acks a record
that is not in the file (acked <= written), while an honest client loses nothing.

Hypothesis generates messages (path built from components that include
planted symlinks, a fifo, a directory, '..', '.', '', overlong names and deep
chains; option sets mixing allowed and refused values) and sends them
through the wire protocol to one live daemon. Every ack is checked right
away: each of its records must be in the file family.
"""

import os
import re
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clh_writerd import protocol
from support import DaemonProcess, RawClient, family_files

from .conftest import HonestClient

EXAMPLES = int(os.environ.get("CLH_SECURITY_FUZZ_EXAMPLES", "250"))

COMPONENTS = ["a", "b", "c.log", "new", "link", "flink.log", "fifo.log", "adir", "..", ".", "", "x" * 300,
              "é.log", "sp ace.log", "\n.log", "link2"]
OPTION_VALUES = {
    "maxBytes": [0, 1, 10, 300, 4096, 1 << 20, -1, True],
    "backupCount": [0, 1, 2, 5, 1001],
    "use_gzip": [True, False],
    "encoding": ["utf-8", "ascii", "latin-1", "utf-16", "rot13", "nope", "UTF8"],
    "chmod": [0o600, 0o644, 0o666, 0o4755, 0o777, 0o2640, 0o1600],
    "umask": [0o022, 0o077, 0],
    "newline": ["", "\n", "\r", "\r\n"],
    "terminator": ["\n", "\r\n", "|", "|\n", ""],
    "unicode_error_policy": ["ignore", "replace", "strict", "bogus"],
    "lock_file_directory": ["@locks", "@link", "@outside", "@adir/deeper", "relative"],
    "owner": [["root", "root"]],
    "when": ["S", "H", "MIDNIGHT", "bogus"],
    "interval": [1, 0],
    "utc": [True],
}

ALLOWED_VALUES = {
    "maxBytes": [0, 10, 300, 4096, 1 << 20],
    "backupCount": [1, 2, 5],
    "use_gzip": [True, False],
    "encoding": ["utf-8", "ascii", "UTF8"],
    "chmod": [0o600, 0o644, 0o666],
    "umask": [0o022, 0o077],
    "newline": ["", "\n", "\r\n"],
    "terminator": ["\n", "\r\n", "|\n"],
    "unicode_error_policy": ["ignore", "replace", "strict"],
    "lock_file_directory": ["@locks", "@adir/deeper"],
}


def _options(values):
    keys = st.sampled_from(sorted(values))
    return st.lists(keys.flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(values[k]))), max_size=4).map(dict)


messages = st.lists(
    st.tuples(
        st.sampled_from(["inside", "inside", "inside", "inside", "outside", "relative", "deep"]),
        st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=5),
        st.one_of(_options(ALLOWED_VALUES), _options(OPTION_VALUES),
                  # rotating files small enough that one batch rotates several times
                  st.tuples(st.sampled_from([10, 300, 1000]), st.sampled_from([1, 2]), _options(ALLOWED_VALUES))
                  .map(lambda t: {**t[2], "maxBytes": t[0], "backupCount": t[1]})),
        st.one_of(st.lists(st.text(max_size=40), min_size=1, max_size=15),
                  st.lists(st.text(min_size=50, max_size=200), min_size=5, max_size=25)),
    ),
    min_size=1, max_size=12,
)


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fuzz"))
    daemon = DaemonProcess(workdir, limits={"max_files": 200, "idle_file_seconds": 1.0})
    os.makedirs(daemon.log_dir)
    outside = os.path.join(workdir, "outside")
    os.makedirs(outside)
    with open(os.path.join(outside, "victim"), "w") as f:
        f.write("victim\n")
    daemon.start()
    yield daemon, outside
    daemon.cleanup()


def _plant(directory: str, outside: str) -> None:
    os.makedirs(os.path.join(directory, "adir"))
    os.makedirs(os.path.join(directory, "locks"))
    os.symlink(outside, os.path.join(directory, "link"))
    os.symlink(os.path.join(directory, "adir"), os.path.join(directory, "link2"))  # stays inside: still refused
    os.symlink(os.path.join(outside, "victim"), os.path.join(directory, "flink.log"))
    os.mkfifo(os.path.join(directory, "fifo.log"))


def _resolve_options(options, directory: str, outside: str):
    out = dict(options)
    lock = out.get("lock_file_directory")
    if isinstance(lock, str) and lock.startswith("@"):
        out["lock_file_directory"] = outside if lock == "@outside" else os.path.join(directory, lock[1:])
    return out


def _outside_listing(outside: str):
    return sorted(os.listdir(outside)), os.stat(os.path.join(outside, "victim")).st_size


def _present(path: str, tag: str, count: int) -> int:
    """How many of records 0..count-1 of ``tag`` have a line in the family of ``path``."""
    found = set()
    pattern = re.compile(rf"^FZ {re.escape(tag)} (\d+) ", re.M)
    for name in family_files(path):
        if name.endswith(".lock") or os.path.isdir(name):
            continue
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as f:  # type: ignore[operator]
            text = f.read().decode("utf-8", "replace")
        found.update(int(m.group(1)) for m in pattern.finditer(text))
    return len(found & set(range(count)))


def test_generated_paths_and_options_never_break_the_daemon_or_ack_unwritten(fuzz_daemon, security_row):
    daemon, outside = fuzz_daemon
    before_outside = _outside_listing(outside)
    client = RawClient(daemon.endpoint, "fuzz")
    totals = {"messages": 0, "acked": 0, "records_acked": 0, "refused": {}}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(messages)
    def run(batch):
        example = os.path.join(daemon.log_dir, uuid.uuid4().hex[:8])
        os.makedirs(example)
        _plant(example, outside)
        for n, (where, parts, options, texts) in enumerate(batch):
            if where == "outside":
                path = os.path.join(outside, *parts)
            elif where == "relative":
                path = os.path.join(*parts)
            elif where == "deep":
                path = os.path.join(example, *(["d"] * 20), *parts)
            else:
                path = os.path.join(example, *parts)
            tag = f"{os.path.basename(example)}-{n}"
            records = [f"FZ {tag} {i} {t}" for i, t in enumerate(texts)]
            reply = client.write(path, records, _resolve_options(options, example, outside))
            totals["messages"] += 1
            if isinstance(reply, protocol.Ack):
                totals["acked"] += 1
                totals["records_acked"] += len(records)
                present = _present(path, tag, len(records))
                assert present == len(records), (path, options, present, len(records))
            else:
                assert isinstance(reply, protocol.Error), reply
                totals["refused"][reply.code] = totals["refused"].get(reply.code, 0) + 1
                assert reply.code != protocol.E_INTERNAL, reply
        ping = client.dealer.send(protocol.encode_ping(1))
        assert ping is None and isinstance(client.recv(10), protocol.Ok)
        assert daemon.proc.poll() is None

    with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest.log")) as honest:
        try:
            run()
        finally:
            client.close()
        honest.stop()
        lost = honest.lost()
    assert _outside_listing(outside) == before_outside, "something was written outside allowed_dirs"
    assert totals["acked"] > 0 and totals["refused"]
    refused = ", ".join(f"{k} {v}" for k, v in sorted(totals["refused"].items()))
    security_row("fuzz: generated paths and option sets (hypothesis)",
                 "daemon stays up and answers ping; nothing outside allowed_dirs; acked <= written for every ack",
                 f"{EXAMPLES} examples, {totals['messages']} messages: {totals['acked']} acked "
                 f"({totals['records_acked']} records, each found in its file), refused: {refused}; "
                 f"honest client {honest.acked} records", lost)
