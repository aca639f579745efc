"""Memory of a training phase on a ``[1024, 64]`` buffer, per framework, and its growth over phases.

    python -m benchmarks.memory [--phases 50] [--frameworks core torchrl rllib] [--json runs/bench_memory.json]

Each framework runs in a fresh subprocess (so no RSS is shared) that builds Metta's PPO on a
CartPole-sized network (4 observations, 2 actions, two hidden layers of 64), fills one buffer of
1024 segments x 64 steps (``batch_size`` 65536, ``bptt_horizon`` 64) with synthetic data, then
runs ``--phases`` training phases on it (``minibatch_size`` 4096, one update epoch: 16 minibatch
steps per phase). Collection is not measured; the same buffer is trained on in every phase.

* core: ``CoreRun``'s ``Experience`` buffer and ``CoreTrainingLoop.training_phase``.
* torchrl: a collector-shaped TensorDict ``[1024, 64]`` through ``TorchRLRun``'s Metta training
  (``MettaSegmentSampler`` + ``MettaPPOLoss`` + Adam).
* rllib: ``MettaPPOLearner`` built without Ray (``build_learner``), ``learner.update`` on a
  Metta-layout batch.

Recorded: RSS before the first phase (after building everything), the peak RSS during each phase
(``VmHWM``, reset to the current RSS just before the phase), the current RSS
(``/proc/self/statm``) after every phase, read after a ``gc.collect()`` so garbage awaiting the
cycle collector does not count as growth. Reported: the peak of phase 1 (it includes one-time
costs such as loading the compiled advantage kernel) and its rise over the RSS before, the
highest peak of the phases after the warm-up, the RSS after phases 1, 10 and the last, and the growth per phase, the slope of a least-squares
line through the RSS after phases 10..last (the first phases grow allocator pools). The workers
run with ``MALLOC_ENV`` so that the RSS follows the memory in use (see there).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import write_json

SEGMENTS, HORIZON = 1024, 64
MINIBATCH_SIZE = 4096
WARMUP_PHASES = 10
"""Phases before the growth fit starts."""

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""glibc settings of the worker: blocks of 128 KiB and more are mmapped and unmapped when freed,
and free heap top beyond 128 KiB is returned to the OS. With glibc's defaults the mmap threshold
rises to the largest freed block (up to 32 MiB) and the heap keeps tens of MiB of freed
minibatch tensors resident, which a leak fills before the RSS grows at all; with these settings
the RSS follows the memory actually in use."""

FRAMEWORKS = ("core", "torchrl", "rllib")
REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size (``VmHWM``) since the start or the last ``reset_peak_rss``, in MiB.

    Not ``getrusage``'s ``ru_maxrss``: it also counts the high-water mark that ``exec`` carries
    over from the forked parent and that ``clear_refs`` does not reset, so a worker started from a
    large process (pytest, the benchmark runner) reported the parent's RSS as its own peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line; the peak RSS needs Linux")


def reset_peak_rss() -> None:
    """Set the peak RSS to the current RSS (Linux >= 4.0, ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def train_args(framework: str):
    from metta_core.run import TrainArgs

    return TrainArgs(
        framework=framework, batch_size=SEGMENTS * HORIZON, bptt_horizon=HORIZON, minibatch_size=MINIBATCH_SIZE,
        update_epochs=1, progress=False, target_return=None,
    )


def core_phase() -> Callable[[], None]:
    """``CoreRun`` with its buffer filled by random steps; returns one training phase."""
    import torch

    from metta_core.run import CoreRun

    run = CoreRun(train_args("core"))
    g = torch.Generator().manual_seed(0)
    buffer = run.experience.buffer
    buffer["env_obs"] = torch.randn(buffer["env_obs"].shape, generator=g)
    with torch.no_grad():
        policy_td = run.policy.forward(buffer.reshape(-1).select("env_obs").clone())
    for key in ("actions", "act_log_prob", "values"):
        buffer[key] = policy_td[key].reshape(SEGMENTS, HORIZON)
    buffer["rewards"] = torch.ones(SEGMENTS, HORIZON)
    buffer["dones"] = (torch.rand(SEGMENTS, HORIZON, generator=g) < 0.02).float()

    def phase() -> None:
        run.loop.training_phase(run.context, run.trainer_cfg.update_epochs, run.ppo_cfg.max_grad_norm)
        run.context.epoch += 1

    return phase


def torchrl_phase() -> Callable[[], None]:
    """``TorchRLRun`` and a batch laid out as its collector's (``[1024 envs, 64 steps]``, every key
    the collector writes, actions/log-probs/values from the policy on random observations)."""
    import torch

    from bridges.torchrl.train import TorchRLRun

    run = TorchRLRun(train_args("torchrl"))
    template = run.env.rollout(1, run.policy)  # the keys and dtypes the collector produces
    g = torch.Generator().manual_seed(0)
    data = template[:1].expand(SEGMENTS, HORIZON).clone()
    data["observation"] = torch.randn(data["observation"].shape, generator=g)
    data["next", "observation"] = torch.randn(data["observation"].shape, generator=g)
    with torch.no_grad():
        run.policy(data)
    data["next", "reward"] = torch.ones_like(data["next", "reward"])
    done = torch.rand(data["next", "done"].shape, generator=g) < 0.02
    data["next", "done"] = done
    data["next", "terminated"] = done
    data["next", "truncated"] = torch.zeros_like(done)

    def phase() -> None:
        run._train_metta(data)
        run.epoch += 1

    return phase


def rllib_phase() -> Callable[[], None]:
    """``MettaPPOLearner`` from ``build_config`` (no Ray) and a Metta-layout batch of random steps."""
    import gymnasium as gym
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.columns import Columns
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from bridges.rllib.config import metta_settings
    from bridges.rllib.layout import first_pass_advantage
    from bridges.rllib.train import build_config

    config = build_config(train_args("rllib"))
    learner = config.build_learner(env=gym.make(config.env))
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    g = torch.Generator().manual_seed(0)
    n = SEGMENTS * HORIZON
    obs = torch.randn(n, 4, generator=g)
    with torch.no_grad():
        dist = module.get_train_action_dist_cls().from_logits(
            module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS])
        actions = dist.sample()
        batch = {
            Columns.OBS: obs,
            Columns.ACTIONS: actions,
            Columns.ACTION_LOGP: dist.logp(actions),
            Columns.VF_PREDS: module.compute_values({Columns.OBS: obs}),
            Columns.REWARDS: torch.ones(n),
            Columns.TERMINATEDS: (torch.rand(n, generator=g) < 0.02).float(),
            Columns.LOSS_MASK: torch.ones(n, dtype=torch.bool),
        }
    batch[Columns.ADVANTAGES] = first_pass_advantage(batch, HORIZON, metta_settings(config)[0])
    ma_batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=n)

    def phase() -> None:
        learner.update(batch=ma_batch)

    return phase


PHASES: dict[str, Callable[[], Callable[[], None]]] = {"core": core_phase, "torchrl": torchrl_phase, "rllib": rllib_phase}


def worker(framework: str, phases: int, leak_kib: int) -> dict[str, Any]:
    """Run in the subprocess: build, then train ``phases`` times, recording RSS.

    ``leak_kib`` > 0 keeps that many KiB of written float32 data alive per phase, a deliberate
    leak that shows what the growth check catches.
    """
    import torch

    warnings.filterwarnings("ignore")
    phase = PHASES[framework]()
    leaked: list[torch.Tensor] = []
    gc.collect()
    before = rss_mb()
    rss, peaks, seconds = [], [], []
    for _ in range(phases):
        reset_peak_rss()
        start = time.perf_counter()
        phase()
        seconds.append(time.perf_counter() - start)
        peaks.append(peak_rss_mb())
        if leak_kib:
            leaked.append(torch.ones(leak_kib * 256))
        gc.collect()
        rss.append(rss_mb())
    return {"framework": framework, "phases": phases, "leak_kib_per_phase": leak_kib, "rss_before_mb": before,
            "peak_rss_mb": peaks[0], "peak_rise_mb": peaks[0] - before, "phase_peak_rss_mb": peaks, "rss_mb": rss,
            "phase_seconds": float(np.median(seconds))}


def growth_kib_per_phase(rss: list[float], start: int) -> float:
    """Slope of the least-squares line through the RSS after phases ``start``..last, in KiB/phase."""
    ys = np.asarray(rss[start - 1:]) * 1024
    return float(np.polyfit(np.arange(len(ys)), ys, 1)[0])


def measure(framework: str, phases: int, warmup: int = WARMUP_PHASES, leak_kib: int = 0) -> dict[str, Any]:
    """Run ``worker`` in a fresh Python process; returns its record plus the summary numbers
    (growth fitted over phases ``warmup``..``phases``)."""
    if not 1 <= warmup < phases - 1:
        raise ValueError(f"need 1 <= warmup < phases - 1 (a line through at least 3 phases), got {warmup=} {phases=}")
    cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", framework, "--phases", str(phases),
           "--leak-kib", str(leak_kib)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    rss = record["rss_mb"]
    record.update({
        "warmup_phases": warmup,
        "rss_phase_1_mb": rss[0],
        "rss_after_warmup_mb": rss[warmup - 1],
        "rss_last_mb": rss[-1],
        "peak_after_warmup_mb": max(record["phase_peak_rss_mb"][warmup:]),
        "growth_kib_per_phase": growth_kib_per_phase(rss, warmup),
        "growth_after_warmup_mb": rss[-1] - rss[warmup - 1],
    })
    return record


def summary(r: dict[str, Any]) -> str:
    """One line: the numbers of one ``measure`` record."""
    return (f"{r['framework']}: peak RSS in phase 1 {r['peak_rss_mb']:.1f} MiB (+{r['peak_rise_mb']:.1f} over "
            f"{r['rss_before_mb']:.1f} before; {r['peak_after_warmup_mb']:.1f} in phases {r['warmup_phases'] + 1}.."
            f"{r['phases']}), "
            f"RSS after phase 1 / {r['warmup_phases']} / {r['phases']}: {r['rss_phase_1_mb']:.1f} / "
            f"{r['rss_after_warmup_mb']:.1f} / {r['rss_last_mb']:.1f} MiB, growth {r['growth_kib_per_phase']:.1f} "
            f"KiB/phase over phases {r['warmup_phases']}..{r['phases']}, {r['phase_seconds']:.2f} s/phase")


def print_table(records: list[dict[str, Any]]) -> None:
    phases, warmup = records[0]["phases"], records[0]["warmup_phases"]
    print(f"buffer [{SEGMENTS}, {HORIZON}], minibatch {MINIBATCH_SIZE}, 1 epoch; RSS in MiB: before phase 1, peak "
          f"during phase 1 and its rise, highest peak of phases {warmup + 1}..{phases}, after phases 1/{warmup}/"
          f"{phases}; growth = slope over phases {warmup}..{phases}")
    print(f"{'framework':<9} {'before':>8} {'peak':>8} {'rise':>6} {'peak>' + str(warmup):>8} {'phase 1':>8} {f'phase {warmup}':>9} "
          f"{f'phase {phases}':>9} {'KiB/phase':>10} {'s/phase':>8}")
    for r in records:
        print(f"{r['framework']:<9} {r['rss_before_mb']:>8.1f} {r['peak_rss_mb']:>8.1f} "
              f"{r['peak_rise_mb']:>6.1f} {r['peak_after_warmup_mb']:>8.1f} {r['rss_phase_1_mb']:>8.1f} "
              f"{r['rss_after_warmup_mb']:>9.1f} {r['rss_last_mb']:>9.1f} "
              f"{r['growth_kib_per_phase']:>10.1f} {r['phase_seconds']:>8.2f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", type=int, default=50)
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--leak-kib", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.phases, args.leak_kib)))
        return {}
    records = [measure(framework, args.phases) for framework in args.frameworks]
    print_table(records)
    write_json(args.json, records)
    return {"results": records}


if __name__ == "__main__":
    main()
