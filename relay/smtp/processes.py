"""Which relay process is sending a message, and whether that process still runs.

A message's row names the process that sends it (``messages.process``, a row of
``processes``), and its recipients wait as ``sending`` until the upstream's answers are
recorded. A process killed in between (``kill -9``, an OOM kill, a power cut) leaves them so.
At start (relay/app.py) and before ``relay messages`` reads, :func:`mark_unknown` turns the
``sending`` recipients of every process that no longer runs into ``unknown``: the upstream may
or may not have taken those copies. It never touches what a live process is still sending,
so it is safe with several workers, ``relay smtp`` and ``relay http`` apart, and a CLI command
beside them.

A process is known by its host (the host name and PID namespace), the kernel's boot id, its
pid and its start time (clock ticks after boot, ``/proc/PID/stat``): a pid reused by another
program, or a reboot, does not pass for the old process. A process of another host cannot be
checked from here; its messages are left alone.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from relay.store import messages

log = logging.getLogger("relay.processes")

SENDING = "sending"
UNKNOWN = "unknown"
UNKNOWN_REPLY = ("outcome unknown: the relay process sending it ({process}) stopped before the "
                 "upstream's answer was recorded; the copy may or may not have been delivered")


@dataclass(frozen=True, slots=True)
class Process:
    host: str  # host name and PID namespace
    boot_id: str  # '' where the kernel does not say
    pid: int
    started: str  # start time in clock ticks after boot; '' where unknown

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host.split()[0]}"


def current() -> Process:
    return Process(_host(), _read(Path("/proc/sys/kernel/random/boot_id")), os.getpid(),
                   _start_ticks(os.getpid()))


def alive(process: Process, here: Process) -> bool | None:
    """Whether ``process`` still runs; None when it cannot be told from ``here`` (another
    host)."""
    if process.host != here.host:
        return None
    if process.boot_id and here.boot_id and process.boot_id != here.boot_id:
        return False  # the machine restarted since
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return not process.started or _start_ticks(process.pid) == process.started


def register(conn: sqlite3.Connection, process: Process | None = None) -> int:
    """This process's row in ``processes`` (made once per process start); its id is what
    message rows name."""
    p = process or current()
    return messages.add_process(conn, p.host, p.boot_id, p.pid, p.started, time.time())


def mark_unknown(conn: sqlite3.Connection, here: Process | None = None) -> int:
    """Set the ``sending`` recipients of processes that stopped to ``unknown``; returns how
    many. ``conn`` is an autocommit connection (the writer before the service starts, or a
    CLI's)."""
    here = here or current()
    marked = 0
    for process_id, *identity in messages.senders(conn, SENDING):
        process = Process(*identity)
        if alive(process, here) is not False:
            continue
        marked += messages.mark_process(conn, process_id, SENDING, UNKNOWN,
                                        UNKNOWN_REPLY.format(process=process), time.time())
    if marked:
        log.warning("%d recipient copies were being sent by relay processes that stopped: "
                    "their outcome is unknown (relay messages list --status unknown)", marked)
    return marked


def _host() -> str:
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """Field 22 of ``/proc/PID/stat`` (after the command name, which may hold spaces)."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""
