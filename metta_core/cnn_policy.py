"""A small convolutional actor-critic over a dense ``(features, height, width)`` grid (MettaGrid)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from metta_core.errors import MettaError
from metta_core.experience import ExperienceSpec, FieldSpec
from metta_core.policy import OBS_KEY, orthogonal_linear, write_policy_outputs


def _conv(n_in: int, n_out: int, kernel: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, kernel, stride)
    nn.init.orthogonal_(conv.weight, float(np.sqrt(2)))
    nn.init.constant_(conv.bias, 0.0)
    return conv


def grid_features(trunk: nn.Module, inv_scale: Tensor, obs: Tensor) -> Tensor:
    """``trunk(obs * inv_scale)`` as ``[N, hidden]`` for observations ``[..., features, height, width]``
    (``N`` = the product of the leading dims; ``inv_scale`` is ``[features, 1, 1]``).

    Integer observations (MettaGrid's uint8 grids) are promoted to float32 by the multiply itself,
    in one pass and to the same numbers as ``.float()`` first; float ones are cast to float32 first."""
    x = obs.reshape(-1, *obs.shape[obs.dim() - 3:])
    return trunk((x if not x.is_floating_point() else x.float()) * inv_scale)


class GridCNN(nn.Module):
    """Shared trunk ``conv 5x5/3 -> ReLU -> conv 3x3/1 -> ReLU -> linear -> ReLU`` with a linear
    actor (``Categorical`` over a ``Discrete`` space) and critic head.

    Init as ``ActorCritic``'s (CleanRL): orthogonal weights with gain sqrt(2) in the trunk, 0.01
    for the actor head and 1 for the critic head, zero biases. The observation is divided by
    ``feature_scale`` (one number per channel, e.g. ``MettaGridEnvironment.feature_scale``)
    before the first convolution, so the buffer can store the raw ``uint8`` grid.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        feature_scale: np.ndarray | None = None,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 3:
            raise MettaError(f"GridCNN needs a Box observation of shape (features, height, width), got {observation_space}")
        if not isinstance(action_space, gym.spaces.Discrete):
            raise MettaError(f"GridCNN supports a Discrete action space, got {action_space}")
        self.obs_shape = tuple(int(s) for s in observation_space.shape)
        self.obs_dtype = torch.uint8 if observation_space.dtype == np.uint8 else torch.float32
        features, height, width = self.obs_shape
        if min(height, width) < 11:
            raise MettaError(f"GridCNN needs a grid of at least 11x11 (a 5x5 stride-3 then a 3x3 convolution), got {height}x{width}")
        scale = np.ones(features, np.float32) if feature_scale is None else np.asarray(feature_scale, np.float32)
        if scale.shape != (features,):
            raise MettaError(f"feature_scale must have one entry per channel ({features},), got shape {scale.shape}")
        self.register_buffer("inv_scale", torch.as_tensor(1.0 / scale).reshape(features, 1, 1))
        self.trunk = nn.Sequential(
            _conv(features, channels[0], 5, 3), nn.ReLU(),
            _conv(channels[0], channels[1], 3, 1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.trunk(torch.zeros(1, *self.obs_shape)).shape[1]
        self.trunk.append(orthogonal_linear(flat, hidden, float(np.sqrt(2))))
        self.trunk.append(nn.ReLU())
        self.actor = orthogonal_linear(hidden, int(action_space.n), 0.01)
        self.critic = orthogonal_linear(hidden, 1, 1.0)

    def encode(self, obs: Tensor) -> Tensor:
        """The trunk's output ``[N, hidden]`` (``grid_features`` with this network's trunk)."""
        return grid_features(self.trunk, self.inv_scale, obs)

    def forward(self, td: TensorDict, action: Tensor | None = None) -> TensorDict:
        obs = td[OBS_KEY]
        batch = obs.shape[: obs.dim() - 3]
        hidden = self.encode(obs)
        return write_policy_outputs(td, batch, (), self.actor(hidden), self.critic(hidden), continuous=False,
                                    action=action, who="GridCNN")

    def get_agent_experience_spec(self) -> ExperienceSpec:
        return ExperienceSpec({OBS_KEY: FieldSpec(self.obs_shape, self.obs_dtype)})

    def reset_memory(self) -> None:
        """Feed-forward: nothing to reset."""
