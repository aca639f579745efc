"""GridCNN: the Policy contract (shapes, log-probs of given actions), CleanRL's init, feature scaling, bad input."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from metta_core.cnn_policy import GridCNN
from metta_core.errors import MettaError
from metta_core.policy import Policy

GRID = gym.spaces.Box(0, 255, (4, 11, 11), np.uint8)
ACTIONS = gym.spaces.Discrete(5)


def test_contract_shapes_and_given_action_log_probs():
    torch.manual_seed(0)
    policy = GridCNN(GRID, ACTIONS)
    assert isinstance(policy, Policy)
    obs = torch.randint(0, 4, (3, 2, 4, 11, 11), dtype=torch.uint8)
    td = policy(TensorDict({"env_obs": obs}, [3, 2]))
    for key in ("actions", "act_log_prob", "entropy", "values"):
        assert td[key].shape == (3, 2), key
    again = policy(TensorDict({"env_obs": obs}, [3, 2]), action=td["actions"])
    torch.testing.assert_close(again["act_log_prob"], td["act_log_prob"])
    assert "actions" not in again.keys()
    spec = policy.get_agent_experience_spec().fields["env_obs"]
    assert spec.shape == (4, 11, 11) and spec.dtype == torch.uint8


def test_orthogonal_init_with_cleanrl_gains():
    policy = GridCNN(GRID, ACTIONS, hidden=32)
    for layer, gain in ((policy.actor, 0.01), (policy.critic, 1.0), (policy.trunk[-2], np.sqrt(2))):
        w = layer.weight.detach().double()
        rows = min(w.shape)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, gain**2 * torch.eye(rows, dtype=torch.double), atol=1e-5, rtol=0)
        assert not layer.bias.any()
    conv = policy.trunk[0].weight.detach().double().flatten(1)
    torch.testing.assert_close(conv @ conv.T, 2.0 * torch.eye(conv.shape[0], dtype=torch.double), atol=1e-5, rtol=0)


def test_feature_scale_divides_each_channel():
    scale = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    torch.manual_seed(0)
    scaled = GridCNN(GRID, ACTIONS, scale)
    torch.manual_seed(0)
    plain = GridCNN(gym.spaces.Box(0, 255, (4, 11, 11), np.float32), ACTIONS)
    obs = torch.randint(0, 9, (5, 4, 11, 11), dtype=torch.uint8)
    a = scaled(TensorDict({"env_obs": obs}, [5]), action=torch.zeros(5, dtype=torch.long))
    b = plain(TensorDict({"env_obs": obs.float() / torch.as_tensor(scale)[:, None, None]}, [5]),
              action=torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(a["values"], b["values"])
    torch.testing.assert_close(a["act_log_prob"], b["act_log_prob"])


def test_bad_spaces_and_scale():
    with pytest.raises(MettaError, match="shape \\(features, height, width\\)"):
        GridCNN(gym.spaces.Box(0, 1, (8,)), ACTIONS)
    with pytest.raises(MettaError, match="Discrete action space"):
        GridCNN(GRID, gym.spaces.Box(-1, 1, (2,)))
    with pytest.raises(MettaError, match="at least 11x11.*got 5x5"):
        GridCNN(gym.spaces.Box(0, 255, (4, 5, 5), np.uint8), ACTIONS)
    with pytest.raises(MettaError, match="one entry per channel \\(4,\\), got shape \\(3,\\)"):
        GridCNN(GRID, ACTIONS, np.ones(3))
