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


@contextmanager
def busy_machine(enabled: bool = True, processes: int | None = None) -> Iterator[int]:
    """Run the block with ``processes`` (default: one per core) spinning processes; yields their count."""
    count = (processes or os.cpu_count() or 1) if enabled else 0
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        yield count
    finally:
        for p in spinners:
            p.terminate()
        for p in spinners:
            p.wait()


def load_label(busy: bool) -> str:
    """``"busy (N spinners)"`` or ``"idle"``, for table titles."""
    return f"busy ({os.cpu_count()} spinning processes)" if busy else "idle (no spinners)"
