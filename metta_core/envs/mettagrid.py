"""MettaGrid as the core loop's training environment: every agent of every arena is one row.

``MettaGridEnvironment(config, num_envs, seed)`` runs ``num_envs`` simulations of one
``MettaGridConfig``; agent ``a`` of simulation ``e`` is row ``e * agents_per_env + a``. It follows
``metta_core.gym_env.TrainingEnvironment`` (SPEC §1 layout): ``get_observations()`` hands out the
observations to act on together with the rewards and terminal flags of the transition that led
into them, and a finished simulation is replaced in the same step, so the observation after a
terminal step is the next episode's first one.

The simulator writes observations into one buffer that it overwrites on the next step; every
observation handed out here is a fresh array (a dense grid is built anew, tokens are copied).

Observations (``obs=``):

- ``"grid"``: ``uint8 (features, height, width)``, the token values scattered onto the agent's
  egocentric window as ``mettagrid.envs.grid_obs_wrapper.GridObsWrapper`` does, not yet divided
  by the feature normalizations (``feature_scale`` holds them; ``GridCNN`` divides). Stored as
  ``uint8`` the buffer is a quarter of the float32 grid.
- ``"tokens"``: the raw ``uint8 (tokens, 3)`` observation (packed location, feature id, value;
  ``0xFF`` padding).

Framework bridges wrap this class instead of writing their own adapter: after ``send_actions``
the arrays of ``get_observations()`` are exactly one vector-env step of ``num_agents`` rows
(TorchRL: an ``EnvBase`` with batch size ``[num_agents]``; RLlib: a ``MultiAgentEnv`` whose agent
ids are the row indices), and ``pop_finished_episodes`` gives per-agent episode returns.

``mettagrid`` is imported when an environment is built, so ``metta_core`` stays importable
without it (``pip install 'metta-bridges[mettagrid]'``, Python >= 3.11).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from metta_core.errors import MettaError

logger = logging.getLogger(__name__)

PREFIX = "mettagrid:"
INSTALL_HINT = "pip install 'metta-bridges[mettagrid]'"
OBS_MODES = ("grid", "tokens")
PADDING = 0xFF
GLOBAL = 0xFE
MAX_GRID_SIDE = 15
"""Token locations pack row and column into 4 bits each (``0xFE``/``0xFF`` are reserved)."""


@dataclass(frozen=True)
class ArenaPreset:
    """A square arena with walls and altars; using an altar (moving into it) gives one heart,
    and each heart gained is a reward of 1."""

    num_agents: int
    size: int
    altars: int
    walls: int
    max_steps: int = 1000


PRESETS = {
    "arena-8": ArenaPreset(num_agents=8, size=15, altars=10, walls=10),
    "arena-24": ArenaPreset(num_agents=24, size=25, altars=30, walls=30),
}


def _mettagrid() -> Any:
    """Import ``mettagrid`` or say how to install it."""
    if sys.version_info < (3, 11):
        raise MettaError(
            f"MettaGrid needs Python >= 3.11 (its wheels are cp311 and newer), this is "
            f"{sys.version_info.major}.{sys.version_info.minor}; create a Python 3.11+ environment "
            f"and run {INSTALL_HINT}"
        )
    try:
        import mettagrid.config.mettagrid_config as mettagrid_config
    except ImportError as exc:
        raise MettaError(f"MettaGrid environments need the mettagrid package ({exc}); run {INSTALL_HINT}") from exc
    return mettagrid_config


def arena_config(preset: ArenaPreset) -> Any:
    """The ``MettaGridConfig`` of an altar arena: ``make_arena`` without combat on a
    ``size x size`` map (1-cell border) with ``walls`` walls and ``altars`` heart-giving altars."""
    mettagrid_config = _mettagrid()
    import mettagrid.mapgen.scenes.random as random_scene
    from mettagrid.builder.envs import make_arena
    from mettagrid.config.handler_config import Handler, updateActor
    from mettagrid.mapgen.mapgen import MapGen

    map_builder = MapGen.Config(
        num_agents=preset.num_agents, width=preset.size, height=preset.size, border_width=1,
        instance_border_width=0,
        instance=random_scene.Random.Config(
            agents=preset.num_agents, objects={"wall": preset.walls, "altar": preset.altars}
        ),
    )
    config = make_arena(preset.num_agents, combat=False, map_builder=map_builder)
    config.label = f"arena-{preset.num_agents}.altars"
    config.game.max_steps = preset.max_steps
    config.game.objects["altar"] = mettagrid_config.GridObjectConfig(
        name="altar", on_use_handler=Handler(mutations=[updateActor({"heart": 1})])
    )
    # make_arena caps hearts at 255, below what a good policy collects in one episode
    config.game.agent.inventory.limits["heart"].base = preset.max_steps
    return config


def preset_config(env_id: str) -> Any:
    """The ``MettaGridConfig`` of ``mettagrid:<preset>``; unknown names list the known ones."""
    name = env_id.removeprefix(PREFIX)
    if name not in PRESETS:
        raise MettaError(f"unknown MettaGrid preset {env_id!r}; known: {sorted(PREFIX + p for p in PRESETS)}")
    return arena_config(PRESETS[name])


class MettaGridEnvironment:
    """``num_envs`` MettaGrid simulations of one config, stepped together; agents are rows.

    Episode seeds (map layout and simulator RNG) come from a ``numpy`` generator seeded with
    ``seed``, one draw per new simulation, so runs with the same seed see the same maps.
    """

    def __init__(self, config: Any, num_envs: int, seed: int, obs: str = "grid") -> None:
        mettagrid_config = _mettagrid()
        from mettagrid.policy.policy_env_interface import PolicyEnvInterface
        from mettagrid.simulator.simulator import Buffers, Simulation

        if not isinstance(config, mettagrid_config.MettaGridConfig):
            raise MettaError(f"MettaGridEnvironment needs a mettagrid MettaGridConfig, got {type(config).__name__}")
        if obs not in OBS_MODES:
            raise MettaError(f"obs must be one of {OBS_MODES}, got {obs!r}")
        if num_envs < 1:
            raise MettaError(f"num_envs must be >= 1, got {num_envs}")
        interface = PolicyEnvInterface.from_mg_cfg(config)
        if interface.vibe_action_names:
            raise MettaError(
                f"MettaGridEnvironment serves one Discrete action per agent; this config has vibe actions "
                f"{interface.vibe_action_names[:3]}...; set game.actions.change_vibe.enabled = False"
            )
        if obs == "grid" and max(interface.obs_height, interface.obs_width) > MAX_GRID_SIDE:
            raise MettaError(
                f"a dense grid needs an observation window of at most {MAX_GRID_SIDE}x{MAX_GRID_SIDE} "
                f"(token locations are 4-bit), got game.obs {interface.obs_height}x{interface.obs_width}; "
                f"shrink game.obs.height/width or use obs='tokens'"
            )
        self._simulation_cls = Simulation
        self._action_names = list(interface.action_names)
        self.obs_mode = obs
        self.num_envs = num_envs
        self.agents_per_env = config.game.num_agents
        self.num_agents = num_envs * self.agents_per_env
        self.single_action_space = gym.spaces.Discrete(len(interface.action_names))
        tokens_shape = tuple(interface.observation_space.shape)
        self._height, self._width = interface.obs_height, interface.obs_width
        self._num_features = max((int(f.id) for f in interface.obs_features), default=0) + 1
        self.feature_scale = np.ones(self._num_features, np.float32)
        """Per-feature normalization (divide grid channel ``f`` by ``feature_scale[f]``)."""
        for feature in interface.obs_features:
            self.feature_scale[feature.id] = max(float(feature.normalization), 1.0)
        if obs == "grid":
            shape = (self._num_features, self._height, self._width)
            self.single_observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
        else:
            self.single_observation_space = gym.spaces.Box(0, 255, tokens_shape, np.uint8)

        n = self.num_agents
        self._raw = {
            "observations": np.zeros((n, *tokens_shape), np.uint8),
            "terminals": np.zeros(n, np.bool_),
            "truncations": np.zeros(n, np.bool_),
            "rewards": np.zeros(n, np.float32),
            "masks": np.ones(n, np.bool_),
            "actions": np.zeros(n, np.int32),
            "teacher_actions": np.zeros(n, np.int32),
        }
        self._buffers = [
            Buffers(**{k: v[self._rows(e)] for k, v in self._raw.items()}) for e in range(num_envs)
        ]
        self._configs = [config.model_copy(deep=True) for _ in range(num_envs)]
        self._action_ids: np.ndarray | None = None
        self._episode_seeds = np.random.default_rng(seed)
        self._sims: list[Any] = [None] * num_envs
        for e in range(num_envs):
            self._new_episode(e)
        self._running_return = np.zeros(n, np.float64)
        self._running_length = np.zeros(n, np.int64)
        self._finished: tuple[list[float], list[int]] = ([], [])
        self._reward_sum = 0.0
        self._reward_steps = 0
        zeros = np.zeros(n, np.float32)
        self._pending = (self._observe(), zeros, zeros.copy(), zeros.copy())

    def _rows(self, e: int) -> slice:
        return slice(e * self.agents_per_env, (e + 1) * self.agents_per_env)

    def _new_episode(self, e: int) -> None:
        """Replace simulation ``e`` by a new one; its first observations land in the buffer."""
        if self._sims[e] is not None:
            self._sims[e].close()
        episode_seed = int(self._episode_seeds.integers(2**31 - 1))
        config = self._configs[e]
        config.game.map_builder.seed = episode_seed  # without it the map is drawn unseeded
        sim = self._simulation_cls(config, seed=episode_seed, buffers=self._buffers[e])
        if self._action_ids is None:
            self._action_ids = np.array([sim.action_ids[name] for name in self._action_names], np.int32)
        self._sims[e] = sim

    def _observe(self) -> np.ndarray:
        """A fresh array of every row's observation (never a view of the simulator's buffer)."""
        tokens = self._raw["observations"]
        if self.obs_mode == "tokens":
            return tokens.copy()
        return tokens_to_grid(tokens, self._num_features, self._height, self._width)

    def get_observations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, slice]:
        obs, rewards, dones, truncateds = self._pending
        return obs, rewards, dones, truncateds, slice(0, self.num_agents)

    def send_actions(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions).reshape(-1)
        if actions.shape != (self.num_agents,):
            raise MettaError(f"send_actions expects {self.num_agents} actions (one per row), got shape {actions.shape}")
        assert self._action_ids is not None
        self._raw["actions"][:] = self._action_ids[actions]
        for sim in self._sims:
            sim.step()
        rewards = self._raw["rewards"].astype(np.float32)
        dones = self._raw["terminals"].astype(np.float32)
        truncateds = self._raw["truncations"].astype(np.float32)
        self._running_return += rewards
        self._running_length += 1
        self._reward_sum += float(rewards.sum())
        self._reward_steps += self.num_agents
        for e, sim in enumerate(self._sims):
            if sim.is_done():
                rows = self._rows(e)
                self._finished[0].extend(self._running_return[rows].tolist())
                self._finished[1].extend(self._running_length[rows].tolist())
                self._running_return[rows] = 0.0
                self._running_length[rows] = 0
                self._new_episode(e)
        self._pending = (self._observe(), rewards, dones, truncateds)

    def pop_finished_episodes(self) -> tuple[list[float], list[int]]:
        """Per-agent returns and lengths of the episodes finished since the last call."""
        finished, self._finished = self._finished, ([], [])
        return finished

    def pop_reward_rate(self) -> float:
        """Mean reward per agent-step over the steps since the last call (nan if none)."""
        rate = self._reward_sum / self._reward_steps if self._reward_steps else float("nan")
        self._reward_sum, self._reward_steps = 0.0, 0
        return rate

    def state_dict(self) -> dict:
        """What can be saved without the simulator (which cannot be pickled): the episode-seed
        generator and finished-episode bookkeeping; ``load_state_dict`` starts fresh episodes."""
        return {
            "episode_seeds": self._episode_seeds.bit_generator.state,
            "finished": (list(self._finished[0]), list(self._finished[1])),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue with fresh episodes: the interrupted ones are cut, marked as truncated in the
        first step handed out (SPEC §1: the flag of the transition into the new first observation)."""
        logger.warning(
            "MettaGrid: the simulator's mid-episode state is not in checkpoints; "
            "the resumed run starts fresh episodes in all %d envs", self.num_envs,
        )
        self._episode_seeds.bit_generator.state = state["episode_seeds"]
        self._finished = (list(state["finished"][0]), list(state["finished"][1]))
        for e in range(self.num_envs):
            self._new_episode(e)
        self._running_return[:] = 0.0
        self._running_length[:] = 0
        zeros = np.zeros(self.num_agents, np.float32)
        self._pending = (self._observe(), zeros, zeros.copy(), np.ones(self.num_agents, np.float32))

    def close(self) -> None:
        for e, sim in enumerate(self._sims):
            if sim is not None:
                sim.close()
                self._sims[e] = None


def tokens_to_grid(tokens: np.ndarray, num_features: int, height: int, width: int) -> np.ndarray:
    """Scatter ``uint8 [rows, tokens, 3]`` observations onto ``uint8 [rows, features, height, width]``.

    A token ``(location, feature, value)`` sets ``grid[row, feature, location >> 4, location & 15]
    = value``; global tokens (location ``0xFE``) go to the centre cell, padding (``0xFF``) and
    tokens outside the window or the feature range are dropped (``GridObsWrapper``'s rules,
    without its division by the feature normalizations).
    """
    location = tokens[..., 0]
    feature = tokens[..., 1]
    y = (location >> 4).astype(np.intp)
    x = (location & 0x0F).astype(np.intp)
    is_global = location == GLOBAL
    y[is_global] = height // 2
    x[is_global] = width // 2
    keep = (location != PADDING) & (y < height) & (x < width) & (feature < num_features)
    row = np.broadcast_to(np.arange(tokens.shape[0])[:, None], location.shape)
    grid = np.zeros((tokens.shape[0], num_features, height, width), np.uint8)
    grid[row[keep], feature[keep], y[keep], x[keep]] = tokens[..., 2][keep]
    return grid
