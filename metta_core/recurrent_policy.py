"""A recurrent actor-critic on the ``Policy`` contract: Metta's ``LSTMReset`` semantics (SPEC §6).

``obs [+ last action] -> Linear+Tanh encoder -> LSTM/GRU``, encoder and cell outputs side by side
into a linear head; one such trunk for the actor and one for the critic (as ``ActorCritic`` keeps
separate networks), or with ``shared_core=True`` one trunk under both heads, as in Metta's agents.

Rollout (a ``[agents]`` tensordict, one env step): the policy keeps each agent's state, indexed by
``td["training_env_ids"]``; it zeroes it where the step's ``dones or truncateds`` is set (the
flags that led into this observation), writes that input state into the step's tensordict
(``actor_lstm_h``, ``actor_lstm_c``, ``critic_lstm_h``, ...; with a shared trunk Metta's ``lstm_h``,
``lstm_c``; ``[agents, layers, hidden]``, detached) for the buffer, and
keeps the output state for the agent's next step. Training (a ``[rows, horizon]`` tensordict of
buffer rows): ``metta_core.recurrent.unroll`` from the stored state of column 0.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from metta_core.errors import MettaError
from metta_core.experience import ExperienceSpec, FieldSpec
from metta_core.policy import OBS_KEY, mlp, write_policy_outputs
from metta_core.recurrent import RecurrentState, init_lstm_like_metta, step_cell, unroll, zero_where_reset

__all__ = ["LAST_ACTIONS_KEY", "RecurrentActorCritic", "RecurrentTrunk"]

LAST_ACTIONS_KEY = "last_actions"
"""The agent's previous action, written into each rollout step by ``CoreTrainingLoop``."""

STATE_KEYS = {"lstm": ("lstm_h", "lstm_c"), "gru": ("gru_h",)}
"""Buffer fields of the stored input state per cell type (Metta's names for the LSTM)."""

_FLAG_KEYS = ("dones", "truncateds")


class RecurrentTrunk(nn.Module):
    """``Linear+Tanh`` encoder and an ``nn.LSTM``/``nn.GRU`` (Metta's init), with per-agent rollout memory.

    Its features are the encoder output next to the cell output (a skip connection: with every
    gate bias at 1 the cell's output varies little with small observations such as CartPole's; a
    linear head on the cell output alone fell to a return of about 11 (one action) within 8k
    steps on CartPole-v1, where the MLP rose to 40 and this trunk to 60 by 28k). ``state_keys`` name
    the buffer fields of its stored input state (``prefix + lstm_h`` ...).
    """

    def __init__(self, n_in: int, hidden_size: int, num_layers: int, cell: str, prefix: str, fused_unroll: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*mlp(n_in, (), hidden_size, float(np.sqrt(2))), nn.Tanh())
        self.core: nn.RNNBase = (nn.LSTM if cell == "lstm" else nn.GRU)(hidden_size, hidden_size, num_layers)
        init_lstm_like_metta(self.core)
        self.state_keys = tuple(prefix + key for key in STATE_KEYS[cell])
        self.fused_unroll = fused_unroll
        self.memory: RecurrentState = ()
        self.reset_memory()

    def reset_memory(self) -> None:
        """Forget every agent's state."""
        device = self.encoder[0].weight.device
        self.memory = tuple(
            torch.zeros(self.core.num_layers, 0, self.core.hidden_size, device=device) for _ in self.state_keys
        )

    def rollout_step(self, td: TensorDict, x: Tensor, env_ids: Tensor, reset: Tensor) -> Tensor:
        """One step of agents ``env_ids`` (``x``: ``[agents, features]``): zero their state where
        ``reset``, store it in ``td``, step, keep the output state. Returns ``[agents, 2 * hidden]``
        (encoder output and cell output)."""
        needed = int(env_ids.max()) + 1 if len(env_ids) else 0
        if needed > self.memory[0].shape[1]:
            extra = needed - self.memory[0].shape[1]
            self.memory = tuple(torch.cat([s, s.new_zeros(s.shape[0], extra, s.shape[2])], dim=1) for s in self.memory)
        state_in = zero_where_reset(tuple(s[:, env_ids] for s in self.memory), reset)
        for key, s in zip(self.state_keys, state_in):
            td[key] = s.transpose(0, 1).detach()
        encoded = self.encoder(x)
        y, state_out = step_cell(self.core, encoded.unsqueeze(0), state_in)
        for memory, s in zip(self.memory, state_out):
            memory[:, env_ids] = s.detach()
        return torch.cat([encoded, y[0]], dim=-1)

    def training_rows(self, td: TensorDict, x: Tensor, reset: Tensor) -> Tensor:
        """SPEC §6 unroll of ``[rows, horizon]`` rows from the stored state of column 0;
        ``[rows, horizon, 2 * hidden]`` (encoder output and cell output)."""
        expected = (*td.batch_size, self.core.num_layers, self.core.hidden_size)
        stored = []
        for key in self.state_keys:
            if key not in td.keys():
                raise MettaError(
                    f"RecurrentActorCritic: the training rows have no {key!r} (the stored input state of each "
                    f"step, SPEC §6); build the Experience with policy.get_agent_experience_spec() merged in, "
                    f"so the rollout stores it"
                )
            if tuple(td[key].shape) != expected:
                raise MettaError(
                    f"RecurrentActorCritic: stored state {key!r} has shape {tuple(td[key].shape)}, expected "
                    f"[rows, horizon, layers, hidden] = {expected} for this module (num_layers="
                    f"{self.core.num_layers}, hidden_size={self.core.hidden_size}); the buffer was filled by "
                    f"a policy of another size: rebuild the Experience from this policy's spec"
                )
            stored.append(td[key][:, 0].transpose(0, 1).contiguous())
        return self.unroll_features(x, tuple(stored), reset)[0]

    def unroll_features(self, x: Tensor, stored: RecurrentState, reset: Tensor) -> tuple[Tensor, RecurrentState]:
        """``unroll`` of ``[rows, horizon, features]`` inputs from ``stored`` (each ``[layers, rows,
        hidden]``) with ``reset`` ``[rows, horizon]``: ``([rows, horizon, 2 * hidden]`` features (encoder
        output and cell output), the state after the last column)."""
        encoded = self.encoder(x)
        y, state = unroll(self.core, encoded, stored, reset, fused=self.fused_unroll)
        return torch.cat([encoded, y], dim=-1), state


def with_last_action(x: Tensor, last_actions: Tensor, num_actions: int | None) -> Tensor:
    """Encoder input of a policy that conditions on its previous action: ``cat([x, a_prev], -1)``.

    ``x`` is ``[*batch, features]`` (the flat observation); ``a_prev = one_hot(last_actions,
    num_actions)`` for ``Discrete`` actions (``last_actions`` of ``batch`` shape, any trailing size-1
    dim accepted) and the flat float action for ``Box`` (``num_actions=None``)."""
    batch = x.shape[:-1]
    if num_actions is None:
        last = last_actions.reshape(*batch, -1).float()
    else:
        last = nn.functional.one_hot(last_actions.reshape(batch).long(), num_actions).float()
    return torch.cat([x, last], dim=-1)


class RecurrentActorCritic(nn.Module):
    """LSTM (or GRU) actor-critic with per-agent rollout memory and stored-state BPTT.

    ``cell``: ``"lstm"`` or ``"gru"``; each cell starts with Metta's init (orthogonal weights,
    gain 1, every bias 1). ``shared_core`` puts actor and critic heads on one trunk (Metta's
    layout); by default each has its own. ``condition_on_last_action`` feeds ``td["last_actions"]``
    (one-hot for ``Discrete``) into the encoders and declares it in the experience spec.
    ``fused_unroll`` selects ``unroll``'s fused path (same numbers to float rounding).
    Discrete actions get a ``Categorical``, ``Box`` actions a diagonal ``Normal`` with a learned
    state-independent log-std, as in ``ActorCritic``.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        hidden_size: int = 128,
        num_layers: int = 1,
        cell: str = "lstm",
        shared_core: bool = False,
        condition_on_last_action: bool = False,
        fused_unroll: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(observation_space, gym.spaces.Box):
            raise MettaError(f"RecurrentActorCritic needs a Box observation space, got {observation_space}")
        if cell not in STATE_KEYS:
            raise MettaError(f"RecurrentActorCritic: cell must be one of {sorted(STATE_KEYS)}, got {cell!r}")
        self.obs_shape = tuple(observation_space.shape)
        self.action_space = action_space
        if isinstance(action_space, gym.spaces.Discrete):
            self.continuous = False
            self.action_shape: tuple[int, ...] = ()
            n_out = int(action_space.n)
        elif isinstance(action_space, gym.spaces.Box):
            self.continuous = True
            self.action_shape = tuple(action_space.shape)
            n_out = int(np.prod(self.action_shape))
            self.log_std = nn.Parameter(torch.zeros(n_out))
        else:
            raise MettaError(f"RecurrentActorCritic supports Discrete and Box action spaces, got {action_space}")
        self.condition_on_last_action = condition_on_last_action
        n_in = int(np.prod(self.obs_shape)) + (n_out if condition_on_last_action else 0)
        names = ("",) if shared_core else ("actor_", "critic_")
        self.trunks = nn.ModuleList(RecurrentTrunk(n_in, hidden_size, num_layers, cell, p, fused_unroll) for p in names)
        self.actor = mlp(2 * hidden_size, (), n_out, 0.01)
        self.critic = mlp(2 * hidden_size, (), 1, 1.0)
        self.state_shape = (num_layers, hidden_size)

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Buffer fields of the stored input states, every trunk's."""
        return tuple(key for trunk in self.trunks for key in trunk.state_keys)

    # -- the Policy contract --------------------------------------------------------------
    def get_agent_experience_spec(self) -> ExperienceSpec:
        """``env_obs``, the stored input states (``[layers, hidden]`` per step), ``dones`` and
        ``truncateds`` (the reset flags), and ``last_actions`` when the policy conditions on it."""
        fields = {OBS_KEY: FieldSpec(self.obs_shape, torch.float32)}
        fields.update({key: FieldSpec(self.state_shape, torch.float32) for key in self.state_keys})
        fields.update({key: FieldSpec((), torch.float32) for key in _FLAG_KEYS})
        if self.condition_on_last_action:
            dtype = torch.float32 if self.continuous else torch.long
            fields[LAST_ACTIONS_KEY] = FieldSpec(self.action_shape, dtype)
        return ExperienceSpec(fields)

    def reset_memory(self) -> None:
        """Forget every agent's rollout state: the next step of any agent starts from zeros."""
        for trunk in self.trunks:
            trunk.reset_memory()

    def forward(self, td: TensorDict, action: Tensor | None = None) -> TensorDict:
        """One rollout step (``td`` of batch ``[agents]``) or training rows (``[rows, horizon]``);
        writes ``actions`` (if ``action`` is None), ``act_log_prob``, ``entropy``, ``values``."""
        if td.batch_dims not in (1, 2):
            raise MettaError(
                f"RecurrentActorCritic.forward: td batch shape must be [agents] (a rollout step) or "
                f"[rows, horizon] (buffer rows), got {list(td.batch_size)}"
            )
        x, reset = self._inputs(td), self._reset_flags(td)
        if td.batch_dims == 1:
            n = td.batch_size[0]
            env_ids = td["training_env_ids"].reshape(n).long() if "training_env_ids" in td.keys() else torch.arange(n)
            features = [trunk.rollout_step(td, x, env_ids, reset) for trunk in self.trunks]
        else:
            features = [trunk.training_rows(td, x, reset) for trunk in self.trunks]
        actor_features, critic_features = (f.reshape(-1, f.shape[-1]) for f in (features[0], features[-1]))
        return write_policy_outputs(
            td, td.batch_size, self.action_shape, self.actor(actor_features), self.critic(critic_features),
            continuous=self.continuous, log_std=getattr(self, "log_std", None), action=action,
            who="RecurrentActorCritic",
        )

    # -- internals ------------------------------------------------------------------------
    def _inputs(self, td: TensorDict) -> Tensor:
        """Encoder input ``[*batch, features]``: the flat observation (and the last action)."""
        batch = td.batch_size
        x = td[OBS_KEY].reshape(*batch, -1).float()
        if not self.condition_on_last_action:
            return x
        if LAST_ACTIONS_KEY not in td.keys():
            raise MettaError(
                f"RecurrentActorCritic(condition_on_last_action=True): the tensordict has no "
                f"{LAST_ACTIONS_KEY!r}; CoreTrainingLoop.add_last_action_to_td writes it during rollout "
                f"and the buffer stores it when the policy's experience spec is part of the Experience spec"
            )
        return with_last_action(x, td[LAST_ACTIONS_KEY], None if self.continuous else int(self.action_space.n))

    def _reset_flags(self, td: TensorDict) -> Tensor:
        """``dones or truncateds`` of each entry (SPEC §6). Rollout steps without the flags
        (evaluation) reset nothing; training rows must have them."""
        missing = [k for k in _FLAG_KEYS if k not in td.keys()]
        if missing and td.batch_dims == 2:
            raise MettaError(
                f"RecurrentActorCritic: the training rows have no {missing} (the reset flags of SPEC §6); "
                f"include them in the tensordict given to forward"
            )
        reset = torch.zeros(td.batch_size, dtype=torch.bool, device=td[OBS_KEY].device)
        for key in _FLAG_KEYS:
            if key in td.keys():
                reset |= td[key].reshape(td.batch_size).bool()
        return reset
