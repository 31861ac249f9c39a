"""systemd's notify protocol (Type=notify), without libsystemd.

READY=1 once the endpoint is bound and served, STOPPING=1 when draining
starts, WATCHDOG=1 at half the WatchdogSec interval, STATUS= lines for
`systemctl status`. Everything is a no-op when NOTIFY_SOCKET is not set.
"""

import os
import socket
import time
from typing import Optional


class SystemdNotifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._sock: Optional[socket.socket] = None
        self._address = ""
        if address.startswith(("/", "@")):
            # '@' is the abstract namespace: a leading NUL on the wire.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        owned = not pid or pid == str(os.getpid())
        self.watchdog_interval: Optional[float] = int(usec) / 2e6 if usec.isdigit() and owned else None
        self._next_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            pass  # systemd went away; nothing useful to do about it

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def stopping(self, status: str) -> None:
        self.notify(f"STOPPING=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        """Ping the watchdog if one is configured and a ping is due."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now >= self._next_watchdog:
            self.notify("WATCHDOG=1")
            self._next_watchdog = now + self.watchdog_interval

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
