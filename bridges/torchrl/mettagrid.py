"""MettaGrid in TorchRL: the core's agents-as-rows environment as an ``EnvBase``, and GridCNN as modules.

``MettaGridEnv(MettaGridEnvironment(config, num_envs, seed))`` is a TorchRL env with batch size
``[num_agents]``: row ``e * agents_per_env + a`` is agent ``a`` of arena ``e`` (SPEC §1 order),
so a ``Collector`` hands out ``[num_agents, steps]`` batches that ``data.reshape(-1, bptt_horizon)``
cuts into Metta's rows and ``MettaPPOLoss`` reads unchanged. The simulator is driven by the
core's adapter (``metta_core.envs.mettagrid``); this module only maps its arrays to tensordicts.

Keys (batch ``[num_agents]``)::

    observation            uint8 [num_agents, features, height, width]   (the core's grid)
    action                 int64 [num_agents]                            (Categorical index)
    ("next", "reward")     float32 [num_agents, 1]
    ("next", "terminated") / ("next", "truncated") / ("next", "done")   bool [num_agents, 1]

Reset: the adapter replaces a finished arena in the same step (SPEC §1), so after a terminal
step ``("next", "observation")`` is already the next episode's first observation, and the reset
TorchRL then asks for hands out the current observations unchanged. TorchRL's own estimators
therefore see the new episode's first observation, not the true last one, after a terminal step;
Metta's loss never reads ``("next", "observation")``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import Tensor, nn
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase
from torchrl.modules import ProbabilisticActor, ValueOperator

from metta_core.cnn_policy import GridCNN, grid_features
from metta_core.envs.mettagrid import MettaGridEnvironment
from metta_core.errors import MettaError

HIDDEN_KEY = "hidden"
"""Where the shared GridCNN trunk writes its output for the actor and critic heads."""


class MettaGridEnv(EnvBase):
    """A ``MettaGridEnvironment`` as a TorchRL env: one batch row per agent (see the module docstring).

    Episode seeds come from the adapter's generator (``MettaGridEnvironment(..., seed)``);
    ``set_seed`` cannot reseed a running simulator and is refused with a changed seed.
    """

    def __init__(self, environment: MettaGridEnvironment) -> None:
        if not isinstance(environment, MettaGridEnvironment):
            raise MettaError(f"MettaGridEnv wraps a metta_core MettaGridEnvironment, got {type(environment).__name__}")
        if environment.obs_mode != "grid":
            raise MettaError(
                f"MettaGridEnv serves the dense grid observation (GridCNN's input); the environment was built "
                f"with obs={environment.obs_mode!r}: build it with obs='grid'"
            )
        rows = environment.num_agents
        super().__init__(batch_size=torch.Size([rows]), device="cpu")
        self.environment = environment
        obs_shape = environment.single_observation_space.shape
        self.observation_spec = Composite(
            observation=Bounded(0, 255, shape=(rows, *obs_shape), dtype=torch.uint8), shape=(rows,)
        )
        self.action_spec = Categorical(int(environment.single_action_space.n), shape=(rows,))
        self.reward_spec = Unbounded(shape=(rows, 1), dtype=torch.float32)
        flag = Categorical(2, shape=(rows, 1), dtype=torch.bool)
        self.done_spec = Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=(rows,))

    def _observations(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        obs, rewards, terminals, truncations, _ = self.environment.get_observations()
        column = (len(rewards), 1)
        return (
            torch.from_numpy(obs),
            torch.from_numpy(rewards).reshape(column),
            torch.from_numpy(terminals).reshape(column).bool(),
            torch.from_numpy(truncations).reshape(column).bool(),
        )

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        """The current observations: finished arenas were already replaced in the step that ended them."""
        flags = {name: torch.zeros(*self.batch_size, 1, dtype=torch.bool) for name in ("done", "terminated", "truncated")}
        return TensorDict({"observation": self._observations()[0], **flags}, batch_size=self.batch_size)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        self.environment.send_actions(tensordict.get("action").numpy())
        obs, reward, terminated, truncated = self._observations()
        return TensorDict(
            {"observation": obs, "reward": reward, "terminated": terminated, "truncated": truncated,
             "done": terminated | truncated},
            batch_size=self.batch_size,
        )

    def _set_seed(self, seed: int | None) -> None:
        """Nothing to seed: the adapter draws episode seeds from the generator it was built with."""

    def close(self, *, raise_if_closed: bool = True) -> None:
        self.environment.close()
        super().close(raise_if_closed=raise_if_closed)


class GridEncoder(nn.Module):
    """GridCNN's trunk as a module of its own: ``observation [..., F, H, W] -> hidden [..., hidden]``
    (``grid_features``, the leading dims restored)."""

    def __init__(self, cnn: GridCNN) -> None:
        super().__init__()
        self.trunk = cnn.trunk
        self.register_buffer("inv_scale", cnn.inv_scale)

    def forward(self, observation: Tensor) -> Tensor:
        batch = observation.shape[: observation.dim() - 3]
        return grid_features(self.trunk, self.inv_scale, observation).reshape(*batch, -1)


def grid_actor_critic(
    observation_shape: tuple[int, int, int], n_actions: int, feature_scale: np.ndarray | None,
    *, action_spec: Any = None,
) -> tuple[ProbabilisticActor, ValueOperator]:
    """GridCNN (its architecture and init, drawn from the torch RNG as the core draws it) as a
    Categorical ``ProbabilisticActor`` and a ``ValueOperator`` sharing the trunk: the actor reads
    ``observation`` and writes ``hidden``, ``logits``, ``action``; the critic reads ``hidden`` and
    writes ``state_value`` (one trunk pass for both, and both losses reach the trunk, as in the
    core's ``GridCNN``). ``action_spec``: the env's, e.g. ``env.full_action_spec``."""
    import gymnasium as gym

    cnn = GridCNN(gym.spaces.Box(0, 255, observation_shape, np.uint8), gym.spaces.Discrete(n_actions), feature_scale)
    trunk = TensorDictModule(GridEncoder(cnn), in_keys=["observation"], out_keys=[HIDDEN_KEY])
    logits = TensorDictModule(cnn.actor, in_keys=[HIDDEN_KEY], out_keys=["logits"])
    actor = ProbabilisticActor(
        TensorDictSequential(trunk, logits), in_keys=["logits"], spec=action_spec,
        distribution_class=torch.distributions.Categorical, return_log_prob=True,
    )
    critic = ValueOperator(cnn.critic, in_keys=[HIDDEN_KEY])
    return actor, critic
