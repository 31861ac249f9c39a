"""Handler options (``clh_writerd.client._options``): one declaration
(HandlerOptions) checked at construction, and the docs tables generated from it."""

import logging
import os
import re
import sys
from typing import Any

import pytest
from support import check_sequences, read_lines, seq_record

from clh_writerd import NonBlockingConcurrentHandler, create_nonblocking_handler
from clh_writerd.client._options import ASYNC, THREAD, HandlerOptions, markdown_table, parse_endpoint

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "client.md")
# The thread handler runs on Python 3.6+, the asyncio handler on 3.8+ (make test-matrix).
if sys.version_info >= (3, 8):
    from clh_writerd import AsyncConcurrentHandler, create_async_concurrent_handler

    FACTORIES = [create_nonblocking_handler, create_async_concurrent_handler]
    HANDLER_TYPES: Any = (NonBlockingConcurrentHandler, AsyncConcurrentHandler)
else:
    FACTORIES = [create_nonblocking_handler]
    HANDLER_TYPES = NonBlockingConcurrentHandler


def test_docs_parameter_table_is_the_options_dataclass():
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<!-- options-table:start -->\n(.*?)<!-- options-table:end -->", text, re.S)
    assert match, "docs/client.md lost its options table markers"
    assert match.group(1) == markdown_table(), \
        "regenerate it: python -m clh_writerd.client._options docs/client.md"


def test_docs_counter_table_is_the_declared_counters():
    """docs/client.md's counters come from protocol.CLIENT_COUNTERS, which
    ClientStats, the report, the daemon's metrics and stats table read."""
    from clh_writerd import protocol
    from clh_writerd.client._stats import COUNTERS, ClientStats
    from clh_writerd.client._stats import markdown_table as counters_table

    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<!-- counters-table:start -->\n(.*?)<!-- counters-table:end -->", text, re.S)
    assert match, "docs/client.md lost its counters table markers"
    assert match.group(1) == counters_table(), "regenerate it: python -m clh_writerd.client._options docs/client.md"
    stats = ClientStats()
    for n, name in enumerate(COUNTERS, 1):
        setattr(stats, name, n)
    assert stats.report() == {c.wire: COUNTERS.index(c.name) + 1 for c in protocol.CLIENT_COUNTERS if c.wire}
    assert set(stats.snapshot(0, 0, 0)) >= set(COUNTERS)


@pytest.mark.skipif(sys.version_info < (3, 8), reason="the daemon needs Python 3.8+ (make test-matrix runs 3.6, 3.7)")
def test_the_daemon_reads_the_declared_report_counters():
    from clh_writerd import protocol
    from clh_writerd.daemon.metrics import CLIENT_REPORTED
    from clh_writerd.daemon.view import CLIENT_COLUMNS

    assert CLIENT_REPORTED == protocol.REPORT_COUNTERS and set(CLIENT_COLUMNS) <= set(protocol.REPORT_COUNTERS)


def test_every_doc_that_lists_the_reported_counters_lists_them_all():
    """The guides that name what a client reports (metrics, protocol, limits) say all of it."""
    from clh_writerd import protocol

    docs = os.path.dirname(DOCS)
    for name in ("operations.md", "protocol.md", "security.md"):
        with open(os.path.join(docs, name), encoding="utf-8") as f:
            paragraphs = [p for p in f.read().split("\n\n") if "`queue_full`" in p]
        assert paragraphs, name
        for paragraph in paragraphs:
            named = set(re.findall(r"`([a-z_]+)`", paragraph))
            assert set(protocol.REPORT_COUNTERS) <= named, (name, set(protocol.REPORT_COUNTERS) - named)


def test_each_handler_takes_its_own_options_and_the_plan_defaults():
    thread, aio = HandlerOptions.build(THREAD), HandlerOptions.build(ASYNC)
    assert (thread.queue_size, thread.sync_level, thread.fallback_on_full) == (10000, logging.ERROR, True)
    assert (aio.queue_size, aio.sync_level, aio.fallback_mode) == (10000, logging.CRITICAL, "drop")
    assert "fallback_mode" not in HandlerOptions.names(THREAD)
    assert "fallback_on_full" not in HandlerOptions.names(ASYNC)
    with pytest.raises(TypeError, match="fallback_mode"):
        HandlerOptions.build(THREAD, fallback_mode="drop")
    with pytest.raises(TypeError, match="queue_sise"):
        HandlerOptions.build(ASYNC, queue_sise=3)


@pytest.mark.parametrize("kind", [THREAD, ASYNC])
def test_levels_by_name_or_number_and_unknown_names_raise_at_construction(kind):
    assert HandlerOptions.build(kind, sync_level="error", level="Warning").sync_level == logging.ERROR
    assert HandlerOptions.build(kind, sync_level=35).sync_level == 35
    with pytest.raises(ValueError, match="sync_level.*ERORR"):
        HandlerOptions.build(kind, sync_level="ERORR")
    with pytest.raises(ValueError, match="level"):
        HandlerOptions.build(kind, level="LOUD")


@pytest.mark.parametrize("bad", [{"queue_size": 0}, {"window": 0}, {"batch_bytes": 10}, {"linger": -1},
                                 {"drain_timeout": "5"}, {"autostart": "yes"}])
def test_bad_values_name_the_option(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        HandlerOptions.build(THREAD, **bad)


def test_endpoint_none_means_no_daemon_and_malformed_endpoints_are_a_clear_error(monkeypatch):
    assert parse_endpoint(None) is None
    assert parse_endpoint("none") is None and parse_endpoint("None") is None
    assert parse_endpoint("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert parse_endpoint("ipc:///run/clh/w.sock") == "ipc:///run/clh/w.sock"
    for bad in ("localhost:5555", "tcp://localhost", "tcp://h:99999", "ftp://x", "ipc://" + "x" * 200, 42):
        with pytest.raises(ValueError, match="endpoint"):
            parse_endpoint(bad)
    monkeypatch.setenv("CLH_WRITERD_ENDPOINT", "none")
    assert HandlerOptions.build(THREAD).endpoint is None
    monkeypatch.setenv("CLH_WRITERD_ENDPOINT", "tcp://nohost")
    with pytest.raises(ValueError, match=r"\$CLH_WRITERD_ENDPOINT"):
        HandlerOptions.build(THREAD)


def test_dictconfig_with_a_malformed_endpoint_fails_with_the_reason(tmp_path):
    import logging.config

    config = {"version": 1, "handlers": {"f": {
        "()": "clh_writerd.create_nonblocking_handler", "filename": str(tmp_path / "a.log"), "endpoint": "tcp:/x"}}}
    with pytest.raises(ValueError, match="Unable to configure handler 'f'") as info:
        logging.config.dictConfig(config)
    # The reason, not a ZMQError (Python 3.6's dictConfig puts it in the message, not in __cause__).
    assert "malformed endpoint 'tcp:/x'" in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize("factory", FACTORIES)
def test_logging_after_close_writes_through_the_fallback_without_a_traceback(tmp_path, factory, capsys):
    path = str(tmp_path / "closed.log")
    handler = factory(path, endpoint=None)
    logger = logging.getLogger(f"after-close.{factory.__name__}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.warning(seq_record("w", 0))
    handler.close()
    logger.warning(seq_record("w", 1))
    logger.error(seq_record("w", 2))
    assert "Traceback" not in capsys.readouterr().err
    check_sequences(read_lines(path), {"w": 3}).assert_complete()
    assert handler.get_stats()["closed_count"] == 2
    logger.removeHandler(handler)
