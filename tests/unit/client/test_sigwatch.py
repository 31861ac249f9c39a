"""The SIGTERM watch's bounds, in this process (its nudge of a main thread
asleep with a SIGTERM pending is proven end to end: tests/e2e/lifecycles/
test_pools.py, the test about CPython's flag)."""

import os
import signal
import threading

import pytest

from clh_writerd.client._sigwatch import SigtermWatch, _nothing

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="no pthread_kill")


def _watch_threads():
    return [t for t in threading.enumerate() if t.name == "clh-writerd-sigterm"]


@pytest.fixture
def restored():
    """Put back SIGURG and the wakeup fd as they were."""
    urg = signal.getsignal(signal.SIGURG)
    yield
    signal.signal(signal.SIGURG, urg)
    signal.set_wakeup_fd(-1)


def test_someone_elses_wakeup_fd_is_left_alone(restored):
    """An asyncio loop's wakeup fd already wakes its main thread: the watch
    neither replaces it nor starts."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    try:
        SigtermWatch(lambda: False).start()
        assert signal.set_wakeup_fd(write) == write
        assert signal.getsignal(signal.SIGURG) == signal.SIG_DFL
        assert not _watch_threads()
    finally:
        os.close(read)
        os.close(write)


def test_a_sigurg_of_the_apps_own_keeps_the_watch_out(restored):
    def own(signum, frame):
        pass

    signal.signal(signal.SIGURG, own)
    SigtermWatch(lambda: False).start()
    assert signal.getsignal(signal.SIGURG) is own
    assert signal.set_wakeup_fd(-1) == -1


def test_a_watch_sets_the_wakeup_fd_and_a_child_forgets_it(restored):
    """Started: the wakeup fd is its pipe, SIGURG does nothing, one thread
    reads. forget_in_child (what a forked child does with the parent's
    watch) puts the wakeup fd back to none and ends the reading."""
    watch = SigtermWatch(lambda: False)
    watch.start()
    watch.start()  # once per process
    threads = _watch_threads()
    assert len(threads) == 1
    assert signal.getsignal(signal.SIGURG) is _nothing
    current = signal.set_wakeup_fd(-1)
    assert current != -1
    signal.set_wakeup_fd(current)
    watch.forget_in_child()
    assert signal.set_wakeup_fd(-1) == -1
    threads[0].join(5)
    assert not threads[0].is_alive()
