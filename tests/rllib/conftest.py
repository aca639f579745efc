"""Fixtures for the RLlib bridge tests: learners built without starting Ray, Metta-layout batches."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from bridges.rllib import metta_ppo_config, metta_settings
from bridges.rllib.layout import first_pass_advantage

HORIZON = 8
SEGMENTS = 4
OBS_DIM = 4


def make_config(**metta_fields):
    """A small CartPole config: batch of SEGMENTS rows of HORIZON, one minibatch, lr 1e-3."""
    fields = dict(batch_size=SEGMENTS * HORIZON, bptt_horizon=HORIZON, minibatch_size=SEGMENTS * HORIZON)
    fields.update(metta_fields)
    return (
        metta_ppo_config("CartPole-v1", **fields)
        .training(lr=1e-3)
        .rl_module(model_config={"fcnet_hiddens": [16], "head_fcnet_hiddens": []})
        .debugging(seed=0)
    )


def build(config):
    return config.build_learner(env=gym.make("CartPole-v1"))


def layout_batch(
    learner, seed: int = 0, segments: int = SEGMENTS, module_id: str = DEFAULT_MODULE_ID
) -> dict[str, torch.Tensor]:
    """Metta-layout data ``[segments * HORIZON]`` flat: random obs/actions/rewards/values, terminals,
    left padding in row 0, stored log-probs near the module's (ratio != 1), and ``A0`` from the core."""
    g = torch.Generator().manual_seed(seed)
    n = segments * HORIZON
    obs = torch.randn(n, OBS_DIM, generator=g)
    actions = torch.randint(0, 2, (n,), generator=g)
    module = learner.module[module_id].unwrapped()
    with torch.no_grad():
        logits = module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        logp = module.get_train_action_dist_cls().from_logits(logits).logp(actions)
    mask = torch.ones(n, dtype=torch.bool)
    mask[:3] = False  # left padding of row 0
    mask[HORIZON * 2 - 1] = False  # a bootstrap slot at the end of row 1
    batch = {
        Columns.OBS: obs,
        Columns.ACTIONS: actions,
        Columns.ACTION_LOGP: logp + 0.3 * torch.randn(n, generator=g),
        Columns.VF_PREDS: torch.randn(n, generator=g),
        Columns.REWARDS: torch.randn(n, generator=g),
        Columns.TERMINATEDS: (torch.rand(n, generator=g) < 0.15).float(),
        Columns.LOSS_MASK: mask,
    }
    batch[Columns.ADVANTAGES] = first_pass_advantage(batch, HORIZON, metta_settings(learner.config)[0])
    return batch


def as_multi_agent(batch: dict[str, torch.Tensor]) -> MultiAgentBatch:
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(dict(batch))}, env_steps=len(batch[Columns.OBS]))


def episode(
    length: int, terminated: bool, seed: int, bad_reward_at: tuple[int, float] | None = None
) -> SingleAgentEpisode:
    """A numpy'd CartPole-shaped episode chunk of ``length`` steps; optionally one reward replaced."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=length).astype(np.float32)
    if bad_reward_at is not None:
        rewards[bad_reward_at[0]] = bad_reward_at[1]
    return SingleAgentEpisode(
        observations=[rng.normal(size=OBS_DIM).astype(np.float32) for _ in range(length + 1)],
        actions=list(rng.integers(0, 2, length)),
        rewards=list(rewards),
        extra_model_outputs={Columns.ACTION_LOGP: list(rng.normal(-0.7, 0.1, length).astype(np.float32))},
        terminated=terminated,
        len_lookback_buffer=0,
    ).to_numpy()


@pytest.fixture
def learner():
    return build(make_config())
