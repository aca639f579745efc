"""Masked-velocity CartPole: a partially observed task an MLP cannot solve and a recurrent policy can.

Importing this module registers the gymnasium id ``CartPoleNoVel-v1``: CartPole-v1 (500-step
limit, solved at 475) whose observation keeps the cart position and the pole angle and drops both
velocities, so a policy has to infer them from consecutive observations. The core's env
construction (``metta_core.gym_env.GymVectorEnvironment``) imports it, so ``--env
CartPoleNoVel-v1`` works from the CLI; elsewhere ``import metta_core.cartpole_no_velocity`` first.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

from metta_core.errors import MettaError

__all__ = ["ENV_ID", "ObservationSubset", "make_cartpole_no_velocity"]

ENV_ID = "CartPoleNoVel-v1"

CARTPOLE_POSITIONS = (0, 2)
"""Indices of cart position and pole angle in CartPole's ``[x, x_dot, theta, theta_dot]``."""


class ObservationSubset(gym.ObservationWrapper):
    """Keep only the entries ``keep`` of a flat ``Box`` observation (in that order)."""

    def __init__(self, env: gym.Env, keep: Sequence[int]) -> None:
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise MettaError(f"ObservationSubset needs a flat Box observation space, got {space}")
        bad = [i for i in keep if not 0 <= i < space.shape[0]]
        if bad or not keep:
            raise MettaError(f"ObservationSubset: keep {list(keep)} must be non-empty indices in 0..{space.shape[0] - 1}")
        self.keep = np.asarray(keep, dtype=np.int64)
        self.observation_space = gym.spaces.Box(space.low[self.keep], space.high[self.keep], dtype=space.dtype)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[self.keep]


def make_cartpole_no_velocity(**kwargs: Any) -> gym.Env:
    """CartPole with only cart position and pole angle observed (the entry point of ``CartPoleNoVel-v1``)."""
    return ObservationSubset(CartPoleEnv(**kwargs), CARTPOLE_POSITIONS)


if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point=f"{__name__}:make_cartpole_no_velocity",
        max_episode_steps=500,
        reward_threshold=475.0,
    )
