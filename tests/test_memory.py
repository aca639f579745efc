"""Leak test: the RSS of a process training on a ``[1024, 64]`` buffer stays flat from phase to phase.

Each framework (core, TorchRL bridge, RLlib bridge) runs ``PHASES`` training phases in a fresh
subprocess (``benchmarks.memory.measure``); the numbers are printed as one ``memory ...`` line
per framework. The growth is the slope of a least-squares line through the RSS after phases
``WARMUP``..``PHASES`` (read after ``gc.collect()``).

Threshold: ``MAX_GROWTH_KIB_PER_PHASE = 64``. Leaking one ``[1024, 64]`` float32 tensor per
phase (the size of one buffer column such as the values or the advantages) grows the RSS by
256 KiB per phase, four times the threshold, so such a leak fails; the last test injects exactly
that leak and checks that it is caught (it measures about 280 KiB/phase). A flat run measures
under 10 KiB/phase: the RSS readings wander by a few hundred KiB, which the fit averages out.
The worker runs with ``benchmarks.memory.MALLOC_ENV``, without which glibc keeps enough freed
memory resident to hide such a leak for many phases.
"""

from __future__ import annotations

import pytest

from benchmarks.memory import FRAMEWORKS, SEGMENTS, HORIZON, measure, summary

PHASES = 12
WARMUP = 3
MAX_GROWTH_KIB_PER_PHASE = 64
ONE_COLUMN_KIB = SEGMENTS * HORIZON * 4 // 1024  # a [1024, 64] float32 tensor: 256 KiB


def report(capsys, record: dict) -> None:
    with capsys.disabled():
        print(f"\nmemory {summary(record)}")


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_rss_does_not_grow_across_training_phases(framework, capsys):
    record = measure(framework, PHASES, warmup=WARMUP)
    report(capsys, record)
    assert record["growth_kib_per_phase"] < MAX_GROWTH_KIB_PER_PHASE, summary(record)


@pytest.mark.slow
def test_growth_check_catches_a_one_column_leak_per_phase(capsys):
    record = measure("core", PHASES, warmup=WARMUP, leak_kib=ONE_COLUMN_KIB)
    report(capsys, record)
    assert record["growth_kib_per_phase"] >= MAX_GROWTH_KIB_PER_PHASE, summary(record)


def test_peak_rss_is_the_workers_own_not_its_forked_parents():
    """``getrusage``'s ``ru_maxrss`` of a worker includes its parent's RSS at fork; ``peak_rss_mb`` must not."""
    import subprocess
    import sys

    import numpy as np

    from benchmarks.memory import REPO

    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this (parent) process
    code = "from benchmarks.memory import peak_rss_mb, reset_peak_rss; reset_peak_rss(); print(peak_rss_mb())"
    child_peak = float(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                      check=True).stdout)
    assert ballast.sum() > 0 and child_peak < 200, child_peak
