"""Metta's ``last_actions`` in TorchRL: each env's previous action as an observation entry.

Metta's rollout (``CoreTrainingLoop.add_last_action_to_td``) gives every step of an agent the
action that agent took at its previous step: zeros (action ``0`` for ``Discrete``) before its
first step, and *not* reset at episode ends or rollout starts (the first step of a new episode
sees the last action of the previous one). A policy that conditions on it
(``RecurrentActorCritic(condition_on_last_action=True)``) feeds ``cat([obs, one_hot(a_prev)])``
to its encoders.

TorchRL pieces: :class:`LastAction`, an env transform that writes ``"last_actions"`` with the
root of every step (so collectors store it beside the observation it goes with), and
:class:`LastActionEncoder`, the core's encoder on the core's input (``with_last_action``).
``from_recurrent_actor_critic`` uses the encoder and ``add_recurrent_transforms`` appends the
transform when a policy conditions on its last action.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.data import TensorSpec
from torchrl.envs import Transform

from metta_core.recurrent_policy import LAST_ACTIONS_KEY, with_last_action

__all__ = ["LastAction", "LastActionEncoder"]


class LastAction(Transform):
    """Write each env's previous action to ``out_key`` (default ``"last_actions"``) at every step.

    ``action_key``'s value of step ``t`` becomes ``out_key`` of step ``t + 1``. Before an env's first
    step it is the action spec's zero; resets (episode ends, a collector's new batch) keep the last
    action, as Metta's loop does. The transform keeps the last action of every env of the batch
    (``env.batch_size``) between calls: use one transform per env.
    """

    def __init__(self, action_key: NestedKey = "action", out_key: NestedKey = LAST_ACTIONS_KEY) -> None:
        super().__init__(in_keys=[action_key], out_keys=[out_key])
        self._last: Tensor | None = None

    def _action_spec(self) -> TensorSpec:
        return self.parent.full_action_spec[self.in_keys[0]]

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        if self._last is None:
            self._last = self._action_spec().zero()
        tensordict_reset.set(self.out_keys[0], self._last.clone())
        return tensordict_reset

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        self._last = tensordict.get(self.in_keys[0]).detach().clone()
        next_tensordict.set(self.out_keys[0], self._last.clone())
        return next_tensordict

    def transform_observation_spec(self, observation_spec: TensorSpec) -> TensorSpec:
        observation_spec[self.out_keys[0]] = self._action_spec().clone()
        return observation_spec


class LastActionEncoder(nn.Module):
    """``encoder(with_last_action(observation, last_actions))``: the core trunk's encoder on the
    core's input (``num_actions`` for ``Discrete`` actions, ``None`` for ``Box``)."""

    def __init__(self, encoder: nn.Module, num_actions: int | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_actions = num_actions

    def forward(self, observation: Tensor, last_actions: Tensor) -> Tensor:
        return self.encoder(with_last_action(observation.float(), last_actions, self.num_actions))
