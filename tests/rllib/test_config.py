"""metta_ppo_config: Metta's settings onto RLlib's PPOConfig (the table in bridges/rllib/config.py)."""

from __future__ import annotations

from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig

from bridges.rllib import MettaPPOLearner, metta_ppo_config, metta_settings
from metta_core.config import PPOConfig


def test_defaults_map_onto_rllib_fields():
    config = metta_ppo_config("CartPole-v1")
    ppo = PPOConfig()
    assert isinstance(config, RLlibPPOConfig)
    assert (config.clip_param, config.entropy_coeff, config.lambda_, config.gamma) == (
        ppo.clip_coef, ppo.ent_coef, ppo.gae_lambda, ppo.gamma,
    )
    assert (config.grad_clip, config.grad_clip_by) == (ppo.max_grad_norm, "global_norm")
    assert config.vf_loss_coeff == ppo.vf_coef
    assert not config.use_kl_loss and not config.shuffle_batch_per_epoch
    assert not config.add_default_connectors_to_learner_pipeline
    assert config.learner_class is MettaPPOLearner
    assert metta_settings(config)[0] == ppo


def test_metta_fields_dotted_and_nested():
    config = metta_ppo_config(
        clip_coef=0.2, **{"vtrace.rho_clip": 0.8}, prioritized_experience_replay={"prio_alpha": 0.5},
        batch_size=1024, bptt_horizon=32, minibatch_size=256, update_epochs=3, total_timesteps=10_000,
    )
    ppo, trainer = metta_settings(config)
    assert (ppo.clip_coef, config.clip_param) == (0.2, 0.2)
    assert ppo.vtrace.rho_clip == 0.8 and ppo.prioritized_experience_replay.prio_alpha == 0.5
    assert (config.train_batch_size_per_learner, config.minibatch_size, config.num_epochs) == (1024, 256, 3)
    assert (trainer.bptt_horizon, trainer.total_timesteps, trainer.sizes["num_minibatches"]) == (32, 10_000, 4)


def test_orthogonal_init_module_starts_like_the_core_policy():
    import gymnasium as gym
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from bridges.rllib.module import OrthogonalInitPPOModule

    config = metta_ppo_config("CartPole-v1").rl_module(
        rl_module_spec=RLModuleSpec(module_class=OrthogonalInitPPOModule),
        model_config={"fcnet_hiddens": [64, 64], "head_fcnet_hiddens": [], "vf_share_layers": False},
    )
    module = config.build_learner(env=gym.make("CartPole-v1")).module[DEFAULT_MODULE_ID].unwrapped()
    params = dict(module.named_parameters())
    for name, p in params.items():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            gain = 0.01 if name.startswith("pi.") else 1.0 if name.startswith("vf.") else 2**0.5
            torch.testing.assert_close(torch.linalg.svdvals(p.detach()), torch.full((min(p.shape),), gain))
