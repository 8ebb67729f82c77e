"""Helpers the benchmark scripts share (each script is run as `python benchmarks/<name>.py`, so this folder is on
sys.path and `from common import ...` works)."""

from __future__ import annotations

import os
import socket


def warn_if_busy(what: str = "these timings are not a measurement") -> None:
    """Other work on the cores skews the timings: say so."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before starting: other work shares the cores, so {what}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
