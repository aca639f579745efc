"""A resumed RLlib run trains its first update with this run's --learning-rate (RLlib's restore loads the
checkpoint's rate into the optimizer; its schedule set the configured one only after the next update)."""

from __future__ import annotations

import dataclasses

import pytest
import ray

from bridges.rllib.cluster import init_private_ray
from bridges.rllib.train import RLlibRun, build_config
from metta_core.run import TrainArgs, phase_learning_rate


def optimizer_lr(run: RLlibRun) -> float:
    results = run.algo.learner_group.foreach_learner(lambda learner: learner.get_optimizer().param_groups[0]["lr"])
    (lr,) = {result.get() for result in results}
    return lr


@pytest.mark.slow
def test_resume_sets_this_runs_learning_rate_before_the_first_update(tmp_path):
    args = TrainArgs(framework="rllib", num_envs=2, batch_size=256, bptt_horizon=16, minibatch_size=128,
                     update_epochs=1, hidden_size=8, total_timesteps=2048, anneal_lr=True, progress=False,
                     target_return=None, trust_checkpoint=True)
    init_private_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run = RLlibRun(build_config(args), args)
        try:
            steps = run.iteration()["env_steps"]
            saved_lr = optimizer_lr(run)
            run.save(tmp_path / "ckpt")
        finally:
            run.close()
        assert saved_lr == pytest.approx(phase_learning_rate(args, steps))  # RLlib: the rate after `steps`
        for resumed_args, expected in [
            (args, saved_lr),  # unchanged settings: the rate the uninterrupted run trains its next update with
            (dataclasses.replace(args, learning_rate=1e-2), phase_learning_rate(dataclasses.replace(args, learning_rate=1e-2), steps)),
            (dataclasses.replace(args, anneal_lr=False, learning_rate=3e-4), 3e-4),
        ]:
            resumed = RLlibRun(build_config(resumed_args), resumed_args, resume=tmp_path / "ckpt")
            try:
                assert optimizer_lr(resumed) == pytest.approx(expected)
            finally:
                resumed.close()
    finally:
        ray.shutdown()
