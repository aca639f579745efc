"""MettaGrid as an RLlib ``MultiAgentEnv``: one simulation, one agent id per agent.

``MettaGridMultiAgentEnv(env_config)`` wraps the core adapter
``metta_core.envs.mettagrid.MettaGridEnvironment`` with one simulation (no second adapter of the
simulator); RLlib's ``num_envs_per_env_runner`` runs several. Agent ids are ``agent_<a>``, ``a``
the agent's index in the simulation, so in the learner's rows agent ``a`` of sub-env ``e`` is row
``e * agents + a`` (SPEC §1), as in the core.

``env_config``: ``env`` (a preset id such as ``"mettagrid:arena-8"``) or ``config`` (a
``MettaGridConfig``), optional ``obs`` (``"grid"`` or ``"tokens"``) and ``seed`` (episode seeds
when RLlib resets without one).

Episodes: all agents of a simulation end together (a lone agent's terminal flag is refused). The
core adapter replaces a finished simulation in the same step, so the observation returned with the
last step is already the next episode's first one, and the ``reset()`` RLlib calls after it
returns that same observation (no step is lost or repeated). ``reset(seed=...)`` or a reset in the
middle of an episode starts new simulations.

Every step's info for each agent is ``{STREAM_KEY: (worker_index, instance), STEP_KEY: steps}``
(``bridges.rllib.layout``'s keys ``"metta_stream"``, ``"metta_t"``)
(``steps`` counts this env's steps over all episodes). ``MettaLayoutConnector`` uses it to chain an
agent's episode chunks into one stream and lay it out in Metta's rows
(``bridges/rllib/layout.py``).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from bridges.rllib.layout import STEP_KEY, STREAM_KEY
from metta_core.envs import check_mettagrid_id
from metta_core.envs.mettagrid import MettaGridEnvironment, preset_config
from metta_core.errors import MettaError

AGENT_PREFIX = "agent_"

_INSTANCES = itertools.count()
"""Creation order of the envs in this process (the second part of the ``STREAM_KEY`` info)."""


def agent_id(index: int) -> str:
    """The agent id of agent ``index`` of a simulation: ``agent_<index>``."""
    return f"{AGENT_PREFIX}{index}"


def _mettagrid_config(env_config: dict) -> Any:
    if "config" in env_config:
        return env_config["config"]
    if "env" not in env_config:
        raise MettaError(
            f"MettaGridMultiAgentEnv: env_config needs 'env' (a preset id such as 'mettagrid:arena-8') or 'config' "
            f"(a MettaGridConfig), got keys {sorted(env_config)}; e.g. config.environment(MettaGridMultiAgentEnv, "
            f"env_config={{'env': 'mettagrid:arena-8'}})"
        )
    check_mettagrid_id(env_config["env"], "MettaGridMultiAgentEnv: env_config['env']")
    return preset_config(env_config["env"])


class MettaGridMultiAgentEnv(MultiAgentEnv):
    """One MettaGrid simulation as an RLlib ``MultiAgentEnv`` (see the module docstring)."""

    def __init__(self, env_config: dict | None = None) -> None:
        super().__init__()
        # an EnvContext from RLlib (worker_index None for an env runner built without one); before the dict copy
        worker = int(getattr(env_config, "worker_index", None) or 0)
        env_config = dict(env_config or {})
        unknown = sorted(set(env_config) - {"env", "config", "obs", "seed"})
        if unknown:
            raise MettaError(
                f"MettaGridMultiAgentEnv: unknown env_config key(s) {unknown}; expected 'env' or 'config', "
                f"and optionally 'obs' and 'seed'"
            )
        self._mettagrid_config = _mettagrid_config(env_config)
        self._obs_mode = env_config.get("obs", "grid")
        self._seeds = np.random.default_rng(int(env_config.get("seed", 0)))
        self._env = self._new_env(int(self._seeds.integers(2**31 - 1)))
        self._stream = (worker, next(_INSTANCES))
        self._steps = 0
        self._episode_start = True
        self.possible_agents = [agent_id(a) for a in range(self._env.agents_per_env)]
        self.agents = list(self.possible_agents)
        self.observation_spaces = {a: self._env.single_observation_space for a in self.possible_agents}
        self.action_spaces = {a: self._env.single_action_space for a in self.possible_agents}
        self.feature_scale = self._env.feature_scale
        """Per-channel normalization of the grid (``GridCNN``'s ``feature_scale``)."""

    def _new_env(self, seed: int) -> MettaGridEnvironment:
        if getattr(self, "_env", None) is not None:
            self._env.close()
        return MettaGridEnvironment(self._mettagrid_config, 1, seed, obs=self._obs_mode)

    def _info(self) -> dict[str, dict]:
        info = {STREAM_KEY: self._stream, STEP_KEY: self._steps}
        return {a: info for a in self.possible_agents}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """The pending first observations (after a finished episode), or new simulations (with ``seed``
        or in the middle of an episode)."""
        if seed is not None:
            self._seeds = np.random.default_rng(seed)
        if seed is not None or not self._episode_start:
            self._env = self._new_env(int(self._seeds.integers(2**31 - 1)))
        self._episode_start = True
        obs = self._env.get_observations()[0]
        return {a: obs[i] for i, a in enumerate(self.possible_agents)}, self._info()

    def step(self, action_dict: dict) -> tuple[dict, dict, dict, dict, dict]:
        missing = [a for a in self.possible_agents if a not in action_dict]
        if missing:
            raise MettaError(
                f"MettaGridMultiAgentEnv.step: no action for agent(s) {missing[:4]}; every agent acts every step "
                f"(agent ids {self.possible_agents[0]}..{self.possible_agents[-1]})"
            )
        self._env.send_actions(np.array([action_dict[a] for a in self.possible_agents]))
        obs, rewards, dones, _, _ = self._env.get_observations()
        ended = bool(self._env.pop_finished_episodes()[0])
        self._steps += 1
        if dones.any() and not ended:
            raise MettaError(
                f"MettaGridMultiAgentEnv: agent(s) {np.flatnonzero(dones).tolist()[:4]} terminated while their "
                f"simulation goes on; the bridge needs every agent of a simulation to end together (one "
                f"MultiAgentEpisode per simulation); use a MettaGrid config without per-agent termination"
            )
        self._episode_start = ended
        terminated = ended and bool(dones.all())
        terminateds = {a: bool(dones[i]) for i, a in enumerate(self.possible_agents)}
        truncateds = {a: ended and not terminated for a in self.possible_agents}
        terminateds["__all__"], truncateds["__all__"] = terminated, ended and not terminated
        observations = {a: obs[i] for i, a in enumerate(self.possible_agents)}
        return observations, {a: float(rewards[i]) for i, a in enumerate(self.possible_agents)}, terminateds, \
            truncateds, self._info()

    def close(self) -> None:
        self._env.close()
