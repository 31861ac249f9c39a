"""Test support, one module per job; every name is also importable as
``from support import NAME`` (other branches' tests rely on it).

- ``daemon``: a real clh-writerd subprocess, a raw protocol client, config files.
- ``oracle``: sequence records and the oracle that reads every rotated file.
- ``processes``: ``wait_for``, child processes, resource sampling, a slow disk.
- ``webapps``: driving the example web apps over HTTP.
- ``debian``: the real engines (rsyslog, podman, prometheus...) installed or
  skipped with a reason (import it as ``support.debian``).
- ``clients``: client processes of the delivery and fault tests (import it
  as ``support.clients``: it imports ``tests.e2e.client.workers``).
"""

from .processes import (  # noqa: F401
    eventually,
    DEFAULT_TIMEOUT,
    wait_for,
    rss_kib,
    fd_count,
    Sample,
    ResourceSampler,
    SLOW_DISK_SITECUSTOMIZE,
    slow_disk_env,
)

from .daemon import (  # noqa: F401
    short_socket_dir,
    toml_value,
    write_config,
    DaemonProcess,
    RawClient,
    hold_clh_lock,
    free_tcp_port,
)

from .oracle import (  # noqa: F401
    RECORD_RE,
    seq_record,
    family_files,
    read_lines,
    OracleReport,
    check_sequences,
    per_writer_order,
    ordered_family,
    set_aside_interrupted_gzips,
    GUARANTEES_ENV,
    record_guarantee,
)

from .webapps import (  # noqa: F401
    http_json,
    http_answers,
    WebRun,
    drive_web_app,
)
