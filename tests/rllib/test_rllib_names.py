"""RLlib's conventions the bridge keeps: its metric names, Box-action modules, action shapes (no Ray)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.metrics import DIFF_NUM_GRAD_UPDATES_VS_SAMPLER_POLICY, WEIGHTS_SEQ_NO

from bridges.rllib import metta_ppo_config, metta_settings
from bridges.rllib.layout import first_pass_advantage
from bridges.rllib.module import OrthogonalInitPPOModule
from metta_core.errors import MettaError
from tests.rllib.conftest import HORIZON, OBS_DIM, as_multi_agent, build, make_config


def stamped_episode(length: int, seed: int, weights_seq_no: int) -> SingleAgentEpisode:
    """A terminated CartPole-shaped chunk sampled with weights version ``weights_seq_no``."""
    rng = np.random.default_rng(seed)
    return SingleAgentEpisode(
        observations=[rng.normal(size=OBS_DIM).astype(np.float32) for _ in range(length + 1)],
        actions=list(rng.integers(0, 2, length)),
        rewards=list(rng.normal(size=length).astype(np.float32)),
        extra_model_outputs={
            Columns.ACTION_LOGP: list(rng.normal(-0.7, 0.1, length).astype(np.float32)),
            WEIGHTS_SEQ_NO: [weights_seq_no] * length,
        },
        terminated=True,
        len_lookback_buffer=0,
    ).to_numpy()


def test_rllib_metric_names_next_to_metta_names():
    learner = build(make_config(target_kl=100.0))
    # 9 steps sampled with version 0, 20 with version 1; the update is version 1
    results = learner.update(episodes=[stamped_episode(9, 0, 0), stamped_episode(20, 1, 1)])[DEFAULT_MODULE_ID]
    assert float(results["vf_explained_var"].peek()) == float(results["explained_variance"].peek())
    lag = float(results[DIFF_NUM_GRAD_UPDATES_VS_SAMPLER_POLICY].peek())
    assert lag == pytest.approx((9 * 1 + 20 * 0) / 29)


def box_config(**model_config):
    return (
        metta_ppo_config("Pendulum-v1", batch_size=4 * HORIZON, bptt_horizon=HORIZON, minibatch_size=4 * HORIZON)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=OrthogonalInitPPOModule),
                   model_config={"fcnet_hiddens": [16], "head_fcnet_hiddens": [], **model_config})
        .debugging(seed=0)
    )


@pytest.mark.parametrize("free_log_std", [False, True])
def test_orthogonal_init_module_builds_for_box_actions(free_log_std):
    learner = box_config(free_log_std=free_log_std).build_learner(env=gym.make("Pendulum-v1"))
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    params = dict(module.named_parameters())
    log_std = [p for n, p in params.items() if n.endswith("log_std")]
    assert len(log_std) == int(free_log_std)
    for p in log_std:
        torch.testing.assert_close(p.detach(), torch.zeros_like(p))
    for name, p in params.items():
        if p.dim() == 2:  # orthogonal: rows (or columns) orthonormal up to the gain
            w = p.detach()
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            gain2 = float(gram.diagonal().mean())
            torch.testing.assert_close(gram, gain2 * torch.eye(len(gram)), atol=1e-5, rtol=1e-5, msg=name)


def box_batch(learner, actions_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 4 * HORIZON
    batch = {
        Columns.OBS: torch.randn(n, 3, generator=g),
        Columns.ACTIONS: torch.randn(*actions_shape, generator=g),
        Columns.ACTION_LOGP: torch.randn(n, generator=g) - 1.0,
        Columns.VF_PREDS: torch.randn(n, generator=g),
        Columns.REWARDS: torch.randn(n, generator=g),
        Columns.TERMINATEDS: torch.zeros(n),
        Columns.LOSS_MASK: torch.ones(n, dtype=torch.bool),
    }
    batch[Columns.ADVANTAGES] = first_pass_advantage(batch, HORIZON, metta_settings(learner.config)[0])
    return batch


def test_continuous_actions_without_their_action_dim_are_refused():
    learner = box_config(free_log_std=True).build_learner(env=gym.make("Pendulum-v1"))
    n = 4 * HORIZON
    learner.update(batch=as_multi_agent(box_batch(learner, (n, 1))))  # the right shape trains
    with pytest.raises(MettaError, match=r"column 'actions' has shape \(32,\), expected \(32, 1\).*reshape"):
        learner.update(batch=as_multi_agent(box_batch(learner, (n,))))
