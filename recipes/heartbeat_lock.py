"""A lock file that its holder keeps alive: the token cache's builder holds one per cache entry, a run one on its
output folder. Machines sharing a file system see each other's.

The file names its holder (host:pid), when it took the lock and the holder's group, if any; the holder touches it
every HEARTBEAT_S. A lock not touched for STALE_AFTER_S is gone, whatever its pid says (after a restart another
process may hold that pid), and so is one held by a process of this machine that no longer runs: either is taken
over, so a crash never leaves a lock that a person must remove. A holder of the same group (a run under torch's
elastic agent, named by its rendezvous id: a group re-formed without a lost machine) is gone after two missed
heartbeats, and a claim waits that long for it; one that still beats is refused, as any other (a group that formed
apart from its rendezvous never writes beside it).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import psutil

HEARTBEAT_S, STALE_AFTER_S = 10, 60  # a holder touches its lock this often; one silent this long is gone
GROUP_WAIT_S = 2 * HEARTBEAT_S + 5  # how long a claim waits for a holder of its own group to be gone


class Holder(NamedTuple):
    who: str  # host:pid
    since: str  # when it took the lock, or "" when the file does not say
    silent_s: float  # since its last heartbeat
    gone: bool
    group: str = ""

    def describe(self) -> str:
        since = f", since {self.since}" if self.since else ""
        return f"{self.who or 'a process still writing the lock'}{since}, last heartbeat {self.silent_s:.0f} s ago"


class HeartbeatLock:
    def __init__(self, path: Path, group: str = ""):
        self.path, self.group = path, group
        self._done: threading.Event | None = None

    def holder(self) -> Holder | None:
        """Who holds the lock, or None when nobody does."""
        try:
            text, silent_s = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except OSError:
            return None
        who, _, rest = text.partition("\n")
        since, _, group = rest.partition("\n")
        host, _, pid = who.partition(":")
        here_and_dead = host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))
        group, silent = group.strip(), silent_s > (2 * HEARTBEAT_S if group and group == self.group else STALE_AFTER_S)
        return Holder(who, since.strip(), silent_s, silent or here_and_dead, group)

    @property
    def me(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def claim(self) -> bool:
        """Take the lock: a new one, or one whose holder is gone. False while a live holder has it. The folder it lives
        in must exist."""
        holder, deadline = self.holder(), time.monotonic() + GROUP_WAIT_S
        while holder and self.group and holder.group == self.group and not holder.gone and time.monotonic() < deadline:
            time.sleep(1)  # (an earlier process of this group, maybe on a lost machine: gone once it misses two beats)
            holder = self.holder()
        if holder is not None and (holder.gone or holder.who == self.me):  # (this process's own: one run after another)
            self.path.unlink(missing_ok=True)
        try:
            with self.path.open("x") as f:
                f.write(f"{self.me}\n{datetime.now():%Y-%m-%d %H:%M:%S}" + (f"\n{self.group}" if self.group else ""))
        except FileExistsError:
            return False
        self._done = threading.Event()
        threading.Thread(target=self._beat, args=(self._done,), daemon=True).start()
        return True

    def _beat(self, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_S):
            try:
                self.path.touch()
            except OSError:  # a full or vanished file system: the lock goes stale, and is taken over
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (only a claimed one: a refused run never removes another's)."""
        if self._done is not None:
            self._done.set()
            self._done = None
            self.path.unlink(missing_ok=True)
