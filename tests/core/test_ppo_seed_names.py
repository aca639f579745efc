"""Metta's seed entry points ``PPOConfig.create`` and ``PPO.compute_ppo_losses``: thin layers over
``metta_core.ppo_math`` with the same numbers as ``ppo_minibatch_loss``."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from metta_core.config import PPOConfig, TrainerConfig
from metta_core.errors import MettaError
from metta_core.policy import ActorCritic
from metta_core.ppo import PPO
from metta_core.ppo_math import ppo_minibatch_loss

OBS = gym.spaces.Box(-1, 1, (3,), np.float32)


class FakeEnv:
    single_action_space = gym.spaces.Discrete(2)
    single_observation_space = OBS


def test_create_returns_the_ppo_loss_with_the_given_config():
    policy = ActorCritic(OBS, FakeEnv.single_action_space, (4,))
    cfg = PPOConfig(clip_coef=0.2)
    loss = cfg.create(policy, TrainerConfig(batch_size=64, bptt_horizon=8, minibatch_size=32), FakeEnv(), "cpu", "ppo", cfg)
    assert isinstance(loss, PPO) and loss.loss_cfg is cfg and loss.instance_name == "ppo" and loss.policy is policy
    other = PPOConfig(clip_coef=0.3)
    assert cfg.create(policy, TrainerConfig(), FakeEnv(), "cpu", "aux", other).loss_cfg is other
    assert cfg.create(policy, TrainerConfig(), FakeEnv(), "cpu", "aux", None).loss_cfg is cfg


@pytest.mark.parametrize("clip_vloss", [True, False])
def test_compute_ppo_losses_equals_the_minibatch_loss_terms(clip_vloss):
    g = torch.Generator().manual_seed(0)
    shape = (4, 6)
    cfg = PPOConfig(clip_vloss=clip_vloss, clip_coef=0.15)
    old_logprob = torch.randn(shape, generator=g)
    new_logprob = old_logprob + 0.3 * torch.randn(shape, generator=g)
    entropy, new_values, values, rewards, a0 = (torch.randn(shape, generator=g) for _ in range(5))
    dones = (torch.rand(shape, generator=g) < 0.2).float()
    prio_w = torch.rand(4, 1, generator=g) + 0.5
    terms = ppo_minibatch_loss(cfg, old_logprob=old_logprob, new_logprob=new_logprob, entropy=entropy,
                               new_values=new_values, values=values, rewards=rewards, dones=dones,
                               advantages=a0, prio_weights=prio_w)
    loss = PPO(None, TrainerConfig(), FakeEnv(), "cpu", "ppo", cfg)
    minibatch = TensorDict({"act_log_prob": old_logprob, "values": values, "returns": a0 + values}, batch_size=shape)
    pg, v, ent, kl, clipfrac = loss.compute_ppo_losses(minibatch, new_logprob, entropy, new_values.reshape(-1),
                                                       terms.ratio, terms.advantages)
    for got, want in [(pg, terms.policy_loss), (v, terms.value_loss), (ent, terms.entropy), (kl, terms.approx_kl),
                      (clipfrac, terms.clipfrac)]:
        assert torch.equal(got, want)
    assert torch.equal(pg - cfg.ent_coef * ent + cfg.vf_coef * v, terms.loss)


def test_compute_ppo_losses_names_missing_minibatch_keys():
    loss = PPO(None, TrainerConfig(), FakeEnv(), "cpu", "ppo", PPOConfig())
    mb = TensorDict({"act_log_prob": torch.zeros(2, 3), "values": torch.zeros(2, 3)}, batch_size=(2, 3))
    with pytest.raises(MettaError, match=r"no \['returns'\].*returns = first-pass advantages \+ values"):
        loss.compute_ppo_losses(mb, *(torch.zeros(2, 3) for _ in range(5)))
