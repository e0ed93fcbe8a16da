"""Which relay processes run: the one record the mail path keeps of them.

Each process that sends mail has a row in ``processes`` (:class:`Registered`), named by what
it leaves in the store while it sends: its messages (``messages.process``), whose recipients
wait as ``sending`` until the upstream's answers are recorded, and its claims on the
recipients of the tries it is sending (``send_claims``, relay/smtp/dedupe.py), which keep
another try of the same message, in any process, from sending at once. A process killed in
between (``kill -9``, an OOM kill, a power cut) leaves both. :func:`sweep` forgets every
process that no longer runs: its ``sending`` recipients become ``unknown`` (the upstream may
or may not have taken those copies), its claims go, and its row goes. It runs at start
(relay/app.py), before ``relay messages`` reads, and on each process's heartbeat; a try
that finds recipients claimed checks their process at once (:func:`running`). It never
touches what a live process is still sending, so it is safe with several workers, ``relay
smtp`` and ``relay http`` apart, and a CLI command beside them.

A process is known by its host (the host name and PID namespace), the kernel's boot id, its
pid and its start time (clock ticks after boot, ``/proc/PID/stat``): a pid reused by another
program, or a reboot, does not pass for the old process, and one killed is known dead at
once, also when the relay restarted at once. A process of another host (relays sharing one
store) cannot be checked from here: it is alive while its heartbeat (``seen_at``, every
:data:`HEARTBEAT_SECONDS` from its first try) is younger than :data:`LEASE_SECONDS`.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.store import deliveries, messages

log = logging.getLogger("relay.processes")

SENDING = "sending"
UNKNOWN = "unknown"
# A process of another host not seen for this long is taken for dead.
LEASE_SECONDS = 60.0
# How often a process that has sent says it is alive and sweeps the dead.
HEARTBEAT_SECONDS = LEASE_SECONDS / 4
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


@dataclass(frozen=True, slots=True)
class Registered:
    """This process and its row in ``processes``."""

    id: int
    process: Process


def current() -> Process:
    return Process(_host(), _read(Path("/proc/sys/kernel/random/boot_id")), os.getpid(),
                   _start_ticks(os.getpid()))


def alive(process: Process, here: Process, seen_at: float, now: float) -> bool:
    """Whether ``process`` still runs, seen from ``here`` at ``now``; one of another host is
    taken for alive while it was seen (``seen_at``) within :data:`LEASE_SECONDS`."""
    if process.host != here.host:
        return now - seen_at < LEASE_SECONDS
    if process.boot_id and here.boot_id and process.boot_id != here.boot_id:
        return False  # the machine restarted since
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return not process.started or _start_ticks(process.pid) == process.started


def register(conn: sqlite3.Connection, now: float | None = None) -> Registered:
    """This process's row in ``processes`` (made once per process start)."""
    p = current()
    return Registered(messages.add_process(conn, p.host, p.boot_id, p.pid, p.started,
                                           time.time() if now is None else now), p)


def see(conn: sqlite3.Connection, me: Registered, now: float) -> None:
    """``me`` is alive at ``now`` (its row made again if another host took it for dead)."""
    p = me.process
    messages.see_process(conn, me.id, p.host, p.boot_id, p.pid, p.started, now)


def beat(conn: sqlite3.Connection, me: Registered, now: float) -> int:
    """:func:`see` ``me``, and forget the processes that stopped (:func:`sweep`)."""
    see(conn, me, now)
    return sweep(conn, me.process, now)


def sweep(conn: sqlite3.Connection, here: Process | None = None, now: float | None = None
          ) -> int:
    """Forget every process that stopped (:func:`forget`); returns how many recipients
    became ``unknown``. ``conn`` is in a transaction, or an autocommit connection (the writer
    before the service starts, or a CLI's): each step holds on its own."""
    here, now = here or current(), time.time() if now is None else now
    rows = messages.all_processes(conn)
    return sum(forget(conn, row[0], Process(*row[1:5]), now) for row in rows
               if not alive(Process(*row[1:5]), here, row[5], now))


def running(conn: sqlite3.Connection, ids: Sequence[int], here: Process, now: float
            ) -> list[int]:
    """Those of processes ``ids`` that still run; the others are forgotten (:func:`forget`),
    as are those with no row left (:func:`sweep` of another process found them dead)."""
    alive_ids = []
    for process_id, *identity, seen_at in messages.process_rows(conn, ids):
        process = Process(*identity)
        if alive(process, here, seen_at, now):
            alive_ids.append(process_id)
        else:
            forget(conn, process_id, process, now)
    return alive_ids


def forget(conn: sqlite3.Connection, process_id: int, process: Process, now: float) -> int:
    """Forget a process that stopped: its ``sending`` recipients become ``unknown`` (returns
    how many), its claims and its row go."""
    marked = messages.mark_process(conn, process_id, SENDING, UNKNOWN,
                                   UNKNOWN_REPLY.format(process=process), now)
    deliveries.drop_process_claims(conn, process_id)
    messages.forget_process(conn, process_id)
    if marked:
        log.warning("%d recipient copies were being sent by relay process %s, which stopped: "
                    "their outcome is unknown (relay messages list --status unknown)",
                    marked, process)
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
