"""Sample efficiency: env steps to a mean return of 475 on CartPole-v1, per framework and seed.

    python -m benchmarks.sample_efficiency [--seeds 0 1 2] [--jobs 2] [--json runs/bench_sample_efficiency.json]

Five learners, every one with the same ``metta-bridges train`` settings (the CLI defaults:
8 envs, batch 2048, bptt_horizon 32, minibatch 512, 4 update epochs, Adam lr 1e-3 eps 1e-12,
two tanh hidden layers of 64, Metta's ``PPOConfig`` defaults where a loss has the setting):

    core            metta_core's CoreTrainingLoop
    torchrl         Collector + MettaPPOLoss + MettaSegmentSampler
    torchrl-native  the same pipeline with TorchRL's ClipPPOLoss + GAE
    rllib           RLlib PPO with MettaPPOLearner
    rllib-native    RLlib's own PPO (PPOTorchLearner + its GAE connector)

Each run is a fresh subprocess (Ray and thread pools do not leak between runs) that stops at the
target or at ``--budget`` env steps. "Steps to target" is the env-step count at which the mean of
the last 100 finished episodes first reached the target; a run that does not reach it in the
budget is reported as such, never dropped. The result is a count of env steps, not a time, so the
machine's load does not change it (RLlib's sampling is not bit-reproducible; the others are).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import write_json

LEARNERS = {
    "core": ("core", False),
    "torchrl": ("torchrl", False),
    "torchrl-native": ("torchrl", True),
    "rllib": ("rllib", False),
    "rllib-native": ("rllib", True),
}


def run_one(learner: str, seed: int, budget: int, out_dir: Path) -> dict:
    """Train one learner for one seed in this process; the run's summary."""
    from metta_core.run import TrainArgs, drive

    framework, native = LEARNERS[learner]
    args = TrainArgs(framework=framework, seed=seed, total_timesteps=budget, out_dir=out_dir, progress=False)
    if framework == "core":
        from metta_core.run import train

        return train(args)
    if framework == "torchrl":
        from bridges.torchrl.train import TorchRLRun

        return drive(TorchRLRun(args, native=native), args, learner)
    import ray

    from bridges.rllib.cluster import init_private_ray
    from bridges.rllib.train import RLlibRun, build_config, build_native_config

    init_private_ray(num_cpus=2, include_dashboard=False)
    try:
        config = build_native_config(args) if native else build_config(args)
        return drive(RLlibRun(config, args), args, learner)
    finally:
        ray.shutdown()


def run_subprocess(learner: str, seed: int, budget: int, tmp: Path, jobs: int) -> dict:
    """One run in a fresh interpreter; its row of the table. With ``jobs > 1`` each run gets
    ``cpu_count // jobs`` (at least 1) torch/numba/OpenMP threads, so parallel runs do not oversubscribe."""
    summary_path = tmp / f"{learner}-{seed}" / "summary.json"
    summary_path.parent.mkdir(parents=True)
    cmd = [sys.executable, "-m", "benchmarks.sample_efficiency", "--budget", str(budget),
           "--one", learner, str(seed), str(summary_path)]
    env = dict(os.environ)
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{learner} seed {seed} failed:\n{done.stderr[-4000:]}")
    summary = json.loads(summary_path.read_text())
    row = {"learner": learner, "seed": seed, "steps_to_target": summary["steps_to_target"],
           "env_steps": summary["env_steps"], "final_return_mean": summary["episode_return_mean"],
           "wall_time_s": summary["wall_time_s"]}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    parser.add_argument("--budget", type=int, default=500_000, help="env-step budget of each run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs side by side (step counts do not depend on load; wall times do)")
    parser.add_argument("--one", nargs=3, metavar=("LEARNER", "SEED", "SUMMARY_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        learner, seed, summary_path = args.one
        summary = run_one(learner, int(seed), args.budget, Path(summary_path).parent / "run")
        Path(summary_path).write_text(json.dumps(summary, default=str))
        return summary

    runs = [(learner, seed) for learner in args.learners for seed in args.seeds]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda run: run_subprocess(*run, args.budget, Path(tmp), args.jobs), runs))

    print(f"\n{'learner':<16}" + "".join(f"{'seed ' + str(s):>12}" for s in args.seeds) + f"{'median':>12}")
    for learner in args.learners:
        steps = [r["steps_to_target"] for r in rows if r["learner"] == learner]
        cells = [f"{s:>12,}" if s is not None else f"{'>' + format(args.budget, ','):>12}" for s in steps]
        reached = [s for s in steps if s is not None]
        median = f"{statistics.median(reached):>12,.0f}" if len(reached) == len(steps) else f"{'n/a':>12}"
        print(f"{learner:<16}" + "".join(cells) + median)
    write_json(args.json, {"budget": args.budget, "runs": rows})
    return {"runs": rows}


if __name__ == "__main__":
    main()
