"""bridges.rllib.train.RLlibRun after a resume: the step counter continues from the checkpoint."""

from __future__ import annotations

import pytest
import ray

from bridges.rllib.cluster import init_private_ray
from bridges.rllib.train import RLlibRun, build_config
from metta_core.run import TrainArgs


@pytest.mark.slow
def test_resumed_run_counts_steps_from_the_checkpoint(tmp_path):
    """The first row after a resume reports the steps of that iteration only (its steps_per_second
    used to divide all steps since the start of training by one iteration's time)."""
    args = TrainArgs(framework="rllib", batch_size=512, bptt_horizon=32, minibatch_size=256, update_epochs=1,
                     progress=False, target_return=None, trust_checkpoint=True)
    init_private_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run = RLlibRun(build_config(args), args)
        try:
            for _ in range(2):
                saved = run.iteration()["env_steps"]
            run.save(tmp_path / "ckpt")
        finally:
            run.close()
        resumed = RLlibRun(build_config(args), args, resume=tmp_path / "ckpt")
        try:
            assert resumed.env_steps == saved
            first = resumed.iteration()
            assert 0 < first["env_steps"] - saved < 2 * args.batch_size
        finally:
            resumed.close()
    finally:
        ray.shutdown()
