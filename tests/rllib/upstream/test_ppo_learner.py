"""Port of RLlib's PPO Learner tests to the Metta config/learner.

Upstream: ray-project/ray ``rllib/algorithms/ppo/tests/test_ppo_learner.py``, the new-API-stack
version with ``save_to_path``/``restore_from_path`` and ``test_kl_coeff_changes`` as stored in the
code index (read_file id 2340597833; the index gives no commit for that version; newest stored
commit of the path: e77192d73c80e1edbab030c5952eefd25a0f305c). Installed Ray: 2.60.0
(b7f4259e944bf6959f721b106adc366ddfa0c356). Changes: ``metta_ppo_config`` in place of
``PPOConfig()``; tiny sizes. ``test_kl_coeff_changes`` is a Metta divergence (no KL penalty):
the config is refused with an error naming ``target_kl``.
"""

from __future__ import annotations

import tempfile

import pytest
from ray.rllib.utils.test_utils import check

from metta_core.errors import MettaError
from tests.rllib.upstream.common import ENV, tiny_config


def test_save_to_path_and_restore_from_path():
    """Saving and loading the state of the Metta PPO learner group (num_learners=0: local learner)."""
    config = tiny_config(gamma=0.99)  # Metta fields go through metta_ppo_config (a bare .training(gamma=...) is refused)
    config.validate()
    config.freeze()
    learner_group1 = config.build_learner_group(env=ENV)
    learner_group2 = config.build_learner_group(env=ENV)
    with tempfile.TemporaryDirectory() as tmpdir:
        learner_group1.save_to_path(tmpdir)
        learner_group2.restore_from_path(tmpdir)
        check(learner_group1.get_state(), learner_group2.get_state())
    assert "metta_loss" in learner_group1.get_state()["learner"]


def test_kl_coeff_changes_is_a_metta_divergence():
    """Upstream trains until RLlib's adaptive KL coefficient moved; Metta's PPO has no KL penalty."""
    config = tiny_config().training(kl_coeff=0.01, use_kl_loss=True)
    with pytest.raises(MettaError, match=r"use_kl_loss=True, kl_coeff=0.01: Metta's PPO has no KL penalty.*target_kl"):
        config.build_learner(env=ENV)
