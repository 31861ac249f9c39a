"""clh_writerd.migrate.setup_logging_queues: the one-import replacement for
CLH's removed setup_logging_queues(), on a real dictConfig configuration, in a
real client process, with a daemon and without one."""

import json
import logging
import os
import subprocess
import sys
import textwrap

from support import check_sequences, read_lines


# An application's logging setup, as people wrote it for CLH: a console and
# two CLH files, one shared by two loggers; formatters, levels, filters.
APP = textwrap.dedent('''
    import json, logging, logging.config, os, sys

    class NoSecrets(logging.Filter):
        def filter(self, record):
            return "secret" not in record.getMessage()

    LOG_DIR, ENDPOINT = sys.argv[1], sys.argv[2]
    logging.config.dictConfig({
        "version": 1,
        "formatters": {"app": {"format": "[%(name)s %(levelname)s] %(message)s"},
                       "audit": {"format": "AUDIT %(message)s"}},
        "filters": {"nosecrets": {"()": NoSecrets}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "level": "ERROR"},
            "file": {"class": "concurrent_log_handler.ConcurrentRotatingFileHandler", "formatter": "app",
                     "filename": os.path.join(LOG_DIR, "app.log"), "maxBytes": 20000, "backupCount": 20,
                     "level": "INFO", "filters": ["nosecrets"]},
            "audit": {"class": "concurrent_log_handler.ConcurrentRotatingFileHandler", "formatter": "audit",
                      "filename": os.path.join(LOG_DIR, "audit.log")},
        },
        "root": {"level": "DEBUG", "handlers": ["console", "file"]},
        "loggers": {"app.db": {"handlers": ["file"], "propagate": False, "level": "DEBUG"},
                    "audit": {"handlers": ["audit"], "propagate": False}},
    })

    from clh_writerd.migrate import setup_logging_queues   # was: concurrent_log_handler.queue
    options = {"endpoint": None} if ENDPOINT == "none" else {}
    wrappers = setup_logging_queues(**options)
    again = setup_logging_queues(**options)

    root, db, audit = logging.getLogger(), logging.getLogger("app.db"), logging.getLogger("audit")
    for i in range(300):
        root.info("SEQ root %d %s", i, "x" * (i % 37))
        db.info("SEQ db %d %s", i, "x" * (i % 37))
        db.debug("below the file handler's level %d", i)
        db.info("a secret the filter drops %d", i)
    for i in range(50):
        audit.warning("SEQ audit %d %s", i, "x" * (i % 37))
    for w in wrappers:
        w.flush()
    print(json.dumps({
        "wrappers": len(wrappers), "again": len(again),
        "root": [type(h).__name__ for h in root.handlers],
        "shared": root.handlers[1] is db.handlers[0],
        "levels": [w.level for w in wrappers],
        "stats": [w.get_stats() for w in wrappers],
    }))
''')


def _run_app(tmp_path, endpoint: str) -> dict:
    script = tmp_path / "app.py"
    script.write_text(APP)
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "CLH_WRITERD_ENDPOINT"}
    if endpoint != "none":
        env["CLH_WRITERD_ENDPOINT"] = endpoint
    result = subprocess.run([sys.executable, str(script), str(log_dir), endpoint], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _check_files(log_dir: str) -> None:
    app_lines = read_lines(os.path.join(log_dir, "app.log"))
    # The CLH handler's formatter is kept; its level and filter still apply.
    assert all(line.startswith(("[root INFO] ", "[app.db INFO] ")) for line in app_lines), app_lines[:3]
    check_sequences([line.split("] ", 1)[1] for line in app_lines], {"root": 300, "db": 300}).assert_complete()
    audit_lines = read_lines(os.path.join(log_dir, "audit.log"))
    assert all(line.startswith("AUDIT ") for line in audit_lines)
    check_sequences([line[len("AUDIT "):] for line in audit_lines], {"audit": 50}).assert_complete()


def _check_structure(report: dict) -> None:
    # Two CLH handlers -> two wrappers; the console is untouched; a second call finds nothing to do.
    assert report["wrappers"] == 2 and report["again"] == 0
    assert report["root"] == ["StreamHandler", "NonBlockingConcurrentHandler"]
    assert report["shared"] is True  # the handler root and app.db shared is still one handler
    assert sorted(report["levels"]) == [logging.NOTSET, logging.INFO]


def test_a_dictconfig_setup_goes_through_the_daemon(start_daemon, tmp_path):
    daemon = start_daemon()
    report = _run_app(tmp_path, daemon.endpoint)
    _check_structure(report)
    for stats in report["stats"]:
        assert stats["state"] == "daemon" and stats["fallback_written"] == 0, stats
    assert sorted(s["acked"] for s in report["stats"]) == [50, 600]
    _check_files(daemon.log_dir)


def test_without_a_daemon_the_same_setup_writes_the_files_itself(tmp_path):
    report = _run_app(tmp_path, "none")
    _check_structure(report)
    for stats in report["stats"]:
        assert stats["state"] == "embedded" and stats["sent"] == 0, stats
    assert sorted(s["fallback_written"] for s in report["stats"]) == [50, 600]
    _check_files(str(tmp_path / "logs"))
