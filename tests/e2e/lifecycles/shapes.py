"""The process shapes real apps run (gunicorn, uvicorn, pools, fork storms,
dictConfig with its defaults), each with real processes against a real
daemon; the sequence oracle reads every file afterwards.

``run_script`` runs a small app (its source here, in the test) with this
interpreter; the app logs ``seq_record``s, so the oracle knows what each
process should have written.
"""

import os
import subprocess
import sys
import textwrap
from typing import Dict, Optional

# What every app script starts with: the oracle's record format.
PRELUDE = '''
import json, logging, os, sys, time
def seq_record(writer, n):
    return f"SEQ {writer} {n} {'x' * (n % 37)}"
'''


def app_env(endpoint: Optional[str], **extra: str) -> Dict[str, str]:
    """os.environ for an app: our endpoint (or none), no inherited one."""
    env = {k: v for k, v in os.environ.items() if k != "CLH_WRITERD_ENDPOINT"}
    env["CLH_WRITERD_ENDPOINT"] = endpoint or "none"
    env.update(extra)
    return env


def write_app(directory: str, source: str, name: str = "app.py") -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(PRELUDE + textwrap.dedent(source))
    return path


def run_script(directory: str, source: str, *args: str, endpoint: Optional[str] = None,
               env: Optional[Dict[str, str]] = None, timeout: float = 120.0,
               name: str = "app.py") -> subprocess.CompletedProcess:
    """Write ``source`` (after PRELUDE) to directory/name and run it."""
    script = write_app(directory, source, name)
    return subprocess.run([sys.executable, script, *args], cwd=directory, env={**app_env(endpoint), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
