"""An env runner killed during training is restarted and training continues (RLlib's fault tolerance).

The run is what ``metta-bridges train --framework rllib --num-env-runners 2`` builds
(``bridges.rllib.train.build_config`` with ``RLlibSettings(restart_failed_env_runners=True)``),
at test size. One env runner process is killed with SIGKILL between iterations; the next
iterations sample from the other one while Ray recreates the dead actor, and RLlib's probe at the
start of an iteration puts it back in service (``num_remote_worker_restarts``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import ray
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

from bridges.rllib.cluster import init_private_ray
from bridges.rllib.settings import RLlibSettings
from bridges.rllib.train import build_config
from metta_core.run import TrainArgs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_env_runner_is_restarted_and_training_continues(tmp_path):
    args = TrainArgs(framework="rllib", num_envs=2, batch_size=64, bptt_horizon=8, minibatch_size=32,
                     update_epochs=1, hidden_size=8, total_timesteps=100_000, out_dir=Path(tmp_path))
    config = build_config(args, RLlibSettings(num_env_runners=2, restart_failed_env_runners=True))
    config.env_runners(num_cpus_per_env_runner=0.5).learners(num_cpus_per_learner=0)
    init_private_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    algo = config.build_algo()
    try:
        group = algo.env_runner_group
        steps = [algo.train()[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED_LIFETIME]]
        victim = group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(60):  # Ray recreates the actor's process in the background; RLlib probes it each iteration
            steps.append(algo.train()[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED_LIFETIME])
            if group.num_remote_worker_restarts() >= 1 and group.num_healthy_remote_workers() == 2:
                break
        assert group.num_remote_worker_restarts() >= 1
        assert group.num_healthy_remote_workers() == 2
        assert all(b > a for a, b in zip(steps, steps[1:])), steps  # every iteration trained on new samples
        pids = group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)
        assert victim not in pids and len(pids) == 2
        print(f"fault injection: killed env runner pid {victim}; {len(steps)} iterations, lifetime env steps "
              f"{steps}; restarts {group.num_remote_worker_restarts()}")
    finally:
        algo.stop()
        ray.shutdown()
