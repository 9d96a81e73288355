"""sd_notify without a dependency: one datagram to $NOTIFY_SOCKET (systemd's Type=notify).

Outside systemd (no NOTIFY_SOCKET) every call does nothing. The supervisor sends READY=1 once
every consumer is attached, WATCHDOG=1 while its children are healthy, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Sends `state` (e.g. "READY=1"); True if a socket was there to send it to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the unit's WatchdogSec), or None if not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.1)
    except ValueError:
        return None
