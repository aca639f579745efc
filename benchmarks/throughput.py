"""End-to-end throughput on CartPole-v1: env steps per second, Metta's PPO against each framework's own.

    python -m benchmarks.throughput [--iterations 1] [--repeats 9] [--json runs/bench_throughput.json]

Measured: env steps collected per second of wall time over ``--iterations`` whole training
iterations (collect one batch, train on it) of the shipped training runs, after one warm-up
iteration per run. Core and TorchRL blocks all start from the runs' initial state (same weights,
same env state for Metta and native; see ``measure`` for why):

* TorchRL: ``TorchRLRun(args)`` (``MettaPPOLoss`` + Metta's segment sampler) against
  ``TorchRLRun(args, native=True)`` (``ClipPPOLoss`` + ``GAE``), same env, collector and networks.
* RLlib: ``build_config(args)`` (``MettaPPOLearner``) against ``build_native_config(args)``
  (RLlib's PPO), same env runners, batch sizes and network; Ray is started locally once
  (``num_cpus=2``).
* The core run (``CoreRun``) is measured alongside TorchRL, for reference.

All runs use the ``metta-bridges train`` defaults (8 envs, batch 2048, minibatch 512, 4 epochs,
hidden 64). The runs of one framework live side by side and are measured in turn, alternating
which goes first (A B B A ...), so load from other processes hits both alike; each cell is the
median over ``--repeats``. Besides wall-clock steps/s the table shows steps per CPU-second of
this process (``time.process_time``), which other processes' load disturbs less. The ratio is
Metta / native (higher is faster; the target is >= 0.95). No assertion: the goal is read off
the table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks import write_json
from metta_core.run import CoreRun, TrainArgs, TrainingRun

TARGET = 0.95


def train_args(framework: str) -> TrainArgs:
    """The CLI defaults, without the progress bar and without stopping at the target return."""
    return TrainArgs(framework=framework, progress=False, target_return=None, stop_at_target=False)


def measure(runs: dict[str, TrainingRun], iterations: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Steps/s (wall and CPU) of each run: one warm-up iteration, then ``repeats`` blocks of
    ``iterations`` per run, the order of the runs reversed on every repeat.

    A run with an in-memory state (``state_dict``: the core and TorchRL runs) starts every block
    from its state before the warm-up, so the Metta and the native run collect with the same
    initial weights from the same env state. This matters: TorchRL's collector resets finished
    envs one call at a time, so a policy that has learned longer episodes collects faster, and
    blocks that went on training would compare what each loss has learned by then rather than
    what the pipelines cost. RLlib runs (no cheap in-memory restore) go on training from block
    to block; episodes per iteration are reported for every run so the effect can be judged.
    """
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "episodes": []} for name in runs}
    start = {name: copy.deepcopy(run.state_dict()) if hasattr(run, "state_dict") else None
             for name, run in runs.items()}
    for run in runs.values():
        run.iteration()
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            run = runs[name]
            if start[name] is not None:
                run.load_state_dict(copy.deepcopy(start[name]))
            steps, episodes = run.env_steps, run.returns.episodes
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(iterations):
                run.iteration()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            steps = run.env_steps - steps
            samples[name]["wall"].append(steps / wall)
            samples[name]["cpu"].append(steps / cpu)
            samples[name]["episodes"].append((run.returns.episodes - episodes) / iterations)
    return {
        name: {"steps_per_s": statistics.median(s["wall"]), "steps_per_cpu_s": statistics.median(s["cpu"]),
               "episodes_per_iteration": statistics.median(s["episodes"]), "restarted": start[name] is not None,
               "wall_samples": s["wall"], "cpu_samples": s["cpu"]}
        for name, s in samples.items()
    }


def torchrl_runs() -> dict[str, TrainingRun]:
    from bridges.torchrl.train import TorchRLRun

    return {
        "torchrl MettaPPOLoss": TorchRLRun(train_args("torchrl")),
        "torchrl ClipPPOLoss": TorchRLRun(train_args("torchrl"), native=True),
        "core (reference)": CoreRun(train_args("core")),
    }


def rllib_runs() -> dict[str, TrainingRun]:
    from bridges.rllib.train import RLlibRun, build_config, build_native_config

    args = train_args("rllib")
    return {
        "rllib MettaPPOLearner": RLlibRun(build_config(args), args),
        "rllib PPO": RLlibRun(build_native_config(args), args),
    }


PAIRS = {
    "torchrl": ("torchrl MettaPPOLoss", "torchrl ClipPPOLoss"),
    "rllib": ("rllib MettaPPOLearner", "rllib PPO"),
}
"""Per framework: (Metta run, native run) whose ratio is checked against ``TARGET``."""


def run_framework(framework: str, iterations: int, repeats: int) -> dict[str, dict[str, Any]]:
    runs = torchrl_runs() if framework == "torchrl" else rllib_runs()
    try:
        return measure(runs, iterations, repeats)
    finally:
        for run in runs.values():
            run.close()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1, help="training iterations per measured block")
    parser.add_argument("--repeats", type=int, default=9, help="measured blocks per run (the median is reported)")
    parser.add_argument("--frameworks", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # TorchRL and RLlib deprecation notices would bury the table
    measured: dict[str, dict[str, Any]] = {}
    if "torchrl" in args.frameworks:
        measured.update(run_framework("torchrl", args.iterations, args.repeats))
    if "rllib" in args.frameworks:
        import ray

        from bridges.rllib.cluster import init_private_ray

        init_private_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            measured.update(run_framework("rllib", args.iterations, args.repeats))
        finally:
            ray.shutdown()
    rows = []
    for framework, (metta, native) in PAIRS.items():
        if framework not in args.frameworks:
            continue
        wall = measured[metta]["steps_per_s"] / measured[native]["steps_per_s"]
        cpu = measured[metta]["steps_per_cpu_s"] / measured[native]["steps_per_cpu_s"]
        rows.append({"framework": framework, "metta": metta, "native": native, "ratio": wall, "ratio_cpu": cpu,
                     "target": TARGET, "met": wall >= TARGET})
    print(f"{'run':<24} {'steps/s':>9} {'steps/cpu-s':>12} {'episodes/it':>12}  blocks   (median of {args.repeats} x "
          f"{args.iterations} iterations of {train_args('core').batch_size} env steps)")
    for name, m in measured.items():
        print(f"{name:<24} {m['steps_per_s']:>9.0f} {m['steps_per_cpu_s']:>12.0f} {m['episodes_per_iteration']:>12.1f}  "
              f"{'from the same start' if m['restarted'] else 'training on'}")
    print(f"\n{'framework':<10} {'Metta/native':>12} {'(cpu)':>7} {'target':>7}  met")
    for r in rows:
        print(f"{r['framework']:<10} {r['ratio']:>12.3f} {r['ratio_cpu']:>7.3f} {r['target']:>7.2f}  "
              f"{'yes' if r['met'] else 'NO'}")
    result = {"iterations": args.iterations, "repeats": args.repeats, "runs": measured, "ratios": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
