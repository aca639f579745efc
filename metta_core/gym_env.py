"""A gymnasium vector env as the core loop's training environment (SPEC §1 layout).

The env autoresets in the same step (``AutoresetMode.SAME_STEP``): after a terminal step the
observation handed out is the next episode's first one, delivered together with the reward and
terminal flag of the step that ended the previous episode, exactly Metta's buffer layout.
"""

from __future__ import annotations

import importlib
import pickle
from typing import Protocol

import gymnasium as gym
import numpy as np

from metta_core.errors import MettaError


class TrainingEnvironment(Protocol):
    """What ``CoreTrainingLoop.rollout_phase`` needs from an environment."""

    num_agents: int
    single_observation_space: gym.Space
    single_action_space: gym.Space

    def get_observations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, slice]:
        """``(obs, rewards, dones, truncateds, training_env_id)`` of the agents to act next."""
        ...

    def send_actions(self, actions: np.ndarray) -> None: ...

    def pop_finished_episodes(self) -> tuple[list[float], list[int]]:
        """Returns and lengths of the episodes finished since the last call."""
        ...


def check_env_id(env_id: str, who: str = "env") -> None:
    """Raise ``MettaError`` unless ``env_id`` is a registered gymnasium env id (gymnasium's reason
    included). As in ``gym.make``, ``"module:EnvName-v0"`` first imports ``module`` (which registers it);
    this package's ``CartPoleNoVel-v1`` is registered here, before the check."""
    importlib.import_module("metta_core.cartpole_no_velocity")  # registers CartPoleNoVel-v1
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MettaError(
                f"{who} {env_id!r}: cannot import {module!r}, the module that should register {name!r} ({exc}); "
                f"install it or fix the module name"
            ) from None
    try:
        gym.spec(name)
    except gym.error.Error as exc:
        raise MettaError(
            f"{who} {env_id!r} is not a registered gymnasium env id ({exc}); use an id such as CartPole-v1 "
            f"(list them with gymnasium.pprint_registry()), or import the package that registers it"
        ) from None


class GymVectorEnvironment:
    """``num_envs`` copies of a gymnasium env stepped synchronously; every copy is one agent."""

    def __init__(self, env_id: str, num_envs: int, seed: int, **make_kwargs) -> None:
        check_env_id(env_id)
        if num_envs < 1:
            raise MettaError(f"GymVectorEnvironment: num_envs must be >= 1, got {num_envs}")
        self.env_id = env_id
        self.envs = gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
            **make_kwargs,
        )
        self.num_agents = num_envs
        self.single_observation_space = self.envs.single_observation_space
        self.single_action_space = self.envs.single_action_space
        obs, _ = self.envs.reset(seed=seed)
        self._pending = (
            obs.astype(np.float32),
            np.zeros(num_envs, np.float32),
            np.zeros(num_envs, np.float32),
            np.zeros(num_envs, np.float32),
        )
        self._running_return = np.zeros(num_envs, np.float64)
        self._running_length = np.zeros(num_envs, np.int64)
        self._finished: tuple[list[float], list[int]] = ([], [])

    def get_observations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, slice]:
        obs, rewards, terminated, truncated = self._pending
        return obs, rewards, terminated, truncated, slice(0, self.num_agents)

    def send_actions(self, actions: np.ndarray) -> None:
        obs, rewards, terminated, truncated, _ = self.envs.step(actions)
        self._running_return += rewards
        self._running_length += 1
        for i in np.flatnonzero(terminated | truncated):
            self._finished[0].append(float(self._running_return[i]))
            self._finished[1].append(int(self._running_length[i]))
            self._running_return[i] = 0.0
            self._running_length[i] = 0
        self._pending = (
            obs.astype(np.float32),
            rewards.astype(np.float32),
            terminated.astype(np.float32),
            truncated.astype(np.float32),
        )

    def pop_finished_episodes(self) -> tuple[list[float], list[int]]:
        finished, self._finished = self._finished, ([], [])
        return finished

    def state_dict(self) -> dict:
        """Everything needed to continue stepping exactly where this env is (sub-envs pickled)."""
        return {
            "sub_envs": pickle.dumps(self.envs.envs),
            "autoreset_envs": self.envs._autoreset_envs.copy(),
            "pending": tuple(x.copy() for x in self._pending),
            "running_return": self._running_return.copy(),
            "running_length": self._running_length.copy(),
            "finished": (list(self._finished[0]), list(self._finished[1])),
        }

    def load_state_dict(self, state: dict) -> None:
        self.envs.envs = pickle.loads(state["sub_envs"])
        self.envs._autoreset_envs = state["autoreset_envs"].copy()
        self._pending = tuple(x.copy() for x in state["pending"])
        self._running_return = state["running_return"].copy()
        self._running_length = state["running_length"].copy()
        self._finished = (list(state["finished"][0]), list(state["finished"][1]))

    def close(self) -> None:
        self.envs.close()
