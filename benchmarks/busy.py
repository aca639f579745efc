"""A "busy machine" for benchmarks: one spinning process per core beside every timing.

    with busy_machine(enabled=args.busy):
        ...  # timings here compete with os.cpu_count() spinning processes

The spinners are plain ``python -c 'while True: pass'`` processes (started with ``subprocess``,
not ``fork``, so a process that has used GNU OpenMP is never forked); they inherit this
process's niceness and are terminated when the block exits, also on error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

SPIN = "while True: pass"
_running = 0
"""Spinners started by ``busy_machine`` blocks of this process that are still running."""


@contextmanager
def busy_machine(enabled: bool = True, processes: int | None = None) -> Iterator[int]:
    """Run the block with ``processes`` (default: one per core) spinning processes; yields their count.

    Inside a block that already spins (``python -m benchmarks --busy`` calling a benchmark's
    ``main(["--busy"])``) no further spinners start."""
    global _running
    count = (processes or os.cpu_count() or 1) if enabled and not _running else 0
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    _running += count
    try:
        yield count
    finally:
        for p in spinners:
            p.terminate()
        for p in spinners:
            p.wait()
        _running -= count


def load_label() -> str:
    """The load the current timings run under, for table titles and JSON."""
    return f"busy ({_running} spinning processes)" if _running else "idle (no spinners)"
