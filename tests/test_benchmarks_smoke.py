"""Smoke tests: the trainer benchmark and the busy-machine helper run on tiny sizes (no timing checked)."""

from __future__ import annotations

import os
import time

import numba
import numpy as np
import pytest

from benchmarks import advantage as bench_advantage
from benchmarks import busy, trainer

TINY = {"num_envs": 2, "batch_size": 512}  # one minibatch of 512 per epoch


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # two tiny training iterations per side
def test_both_sides_run_and_summarize():
    for run in (trainer.run_core, trainer.run_plain):
        rows = run(1, **TINY)
        assert len(rows) == 1 and rows[0]["steps"] == 512 and rows[0]["rollout"] > 0 and rows[0]["phase"] > 0
    summary = trainer.summarize(rows)
    text, ratios = trainer.table({"core": summary, "plain": summary}, "smoke")
    assert ratios["phase"] == 1.0 and "training phase ms" in text


def test_busy_machine_starts_one_spinner_per_core_and_stops_them(monkeypatch):
    seen = []
    monkeypatch.setattr(busy.subprocess, "Popen", lambda cmd: seen.append(_Spawned(cmd)) or seen[-1])
    with busy.busy_machine(processes=3) as count:
        assert count == 3 and busy.load_label() == "busy (3 spinning processes)"
        with busy.busy_machine() as nested:  # a benchmark's own --busy inside the suite's
            assert nested == 0
    assert busy.load_label() == "idle (no spinners)"
    assert [s.cmd[-1] for s in seen] == [busy.SPIN] * 3 and all(s.stopped for s in seen)
    with busy.busy_machine(enabled=False) as count:
        assert count == 0


def test_busy_machine_really_spins_and_cleans_up():
    with busy.busy_machine(processes=1) as count:
        assert count == 1, f"busy_machine started {count} spinners (another block still running?)"
        deadline = time.monotonic() + 10  # a loaded machine may not have scheduled the new process yet
        while True:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith(busy.SPIN)]
            mine = [p for p in pids if _parent(p) == os.getpid()]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(mine) == 1 and _alive(mine[0])
    assert not _alive(mine[0])


def test_crossover_table_runs():
    rows = bench_advantage.crossover(repeats=1, shapes=[(8, 16), (5, 3)])["crossover"]
    assert [r["shape"] for r in rows] == [[8, 16], [5, 3]]
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS and np.isfinite(rows[0]["ratio"])


def _timed_log(monkeypatch, cache):
    """Run ``measure`` on two logging candidates; the log marks each clock read with "|"."""
    log = []
    clock = iter(range(1000))
    monkeypatch.setattr(bench_advantage.time, "perf_counter", lambda: log.append("|") or next(clock))
    fns = {name: (lambda name=name: log.append(name)) for name in ("a", "b")}
    evict = (lambda: log.append("evict")) if cache == "cold" else None
    med = bench_advantage.measure(fns, repeats=2, slow=set(), evict=evict)
    assert med == {"a": 1, "b": 1}
    return log


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_every_timed_call_follows_the_same_preparation(monkeypatch, cache):
    log = _timed_log(monkeypatch, cache)
    assert log[:2] == ["a", "b"]  # warm-up (JIT compile)
    rounds = log[2:]
    before = {"warm": lambda name: name, "cold": lambda name: "evict"}[cache]
    assert rounds == [x for _ in range(2) for name in "ab" for x in (before(name), "|", name, "|")]


def test_cache_eviction_reads_a_buffer_larger_than_the_cache():
    assert bench_advantage.last_level_cache_bytes() >= 1 << 20
    evict = bench_advantage.evict_caches(1 << 16)
    assert evict() == (1 << 16) / 64  # one float64 of 1.0 per 64-byte line


class _Spawned:
    def __init__(self, cmd):
        self.cmd, self.stopped = cmd, False

    def terminate(self):
        self.stopped = True

    def wait(self):
        return 0


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:  # other jobs' processes come and go while /proc is read
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().split(") ")[1].split()[1])
    except OSError:
        return -1


def test_recurrent_phase_cases_agree_before_timing():
    from benchmarks import recurrent_phase

    cases, holders = recurrent_phase.cases((2, 8))  # asserts MettaPPOLoss == core on the same rows
    assert set(cases) == {"core", "torchrl MettaPPOLoss", "torchrl ClipPPOLoss"} and len(holders) == 3
    assert all(float(fn().detach()) == float(fn().detach()) for fn in cases.values())
