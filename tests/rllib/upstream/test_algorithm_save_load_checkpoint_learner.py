"""Port of RLlib's algorithm checkpoint test (learner state) to the Metta config.

Upstream: ray-project/ray ``rllib/algorithms/tests/test_algorithm_save_load_checkpoint_learner.py``
at commit 9094933b2f9bc21c80782443c3674ea91b0b4062 (the newest stored version). Installed Ray:
2.60.0 (b7f4259e944bf6959f721b106adc366ddfa0c356). Changes: ``metta_ppo_config`` (tiny sizes) in
place of ``PPOConfig().training(train_batch_size=2, minibatch_size=2)``; new-stack result keys
(``LEARNER_RESULTS`` instead of ``info/learner``); the compared results are the learner's loss
and Metta stats (throughput and timer metrics differ between any two runs); ``save_to_path`` /
``restore_from_path`` (2.60's names for ``save_checkpoint`` / ``load_checkpoint``).
"""

from __future__ import annotations

import tempfile

import pytest
import ray
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import LEARNER_RESULTS
from ray.rllib.utils.test_utils import check

from bridges.rllib.cluster import init_private_ray

COMPARED = ("policy_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "explained_variance", "vf_explained_var",
            "anneal_beta", "gradients_default_optimizer_global_norm")


def _config():
    from tests.rllib.upstream.common import tiny_config

    return tiny_config().reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=1).debugging(seed=10)


def _learner_stats(results) -> dict:
    stats = results[LEARNER_RESULTS][DEFAULT_MODULE_ID]
    return {k: float(stats[k]) for k in COMPARED}


@ray.remote(num_cpus=1)
def save_and_train(tmpdir: str) -> dict:
    """Build, checkpoint, then train 2 iterations (a Ray task: its own process and global RNG)."""
    algo = _config().build_algo()
    try:
        algo.save_to_path(tmpdir)
        for _ in range(2):
            results = algo.train()
        return _learner_stats(results)
    finally:
        algo.stop()


@ray.remote(num_cpus=1)
def load_and_train(tmpdir: str) -> dict:
    algo = _config().build_algo()
    try:
        algo.restore_from_path(tmpdir)
        for _ in range(2):
            results = algo.train()
        return _learner_stats(results)
    finally:
        algo.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_save_and_restore():
    init_private_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            ray.get(save_and_train.remote(tmpdir))
            results_algo_2 = ray.get(load_and_train.remote(tmpdir))
            results_algo_3 = ray.get(load_and_train.remote(tmpdir))
            check(results_algo_3, results_algo_2)
    finally:
        ray.shutdown()
