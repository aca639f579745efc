"""Metta's first-pass advantage as a TorchRL value estimator (SPEC §2 with ``w = 1``)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torchrl.objectives.value import ValueEstimatorBase

from metta_core.advantage import compute_advantage
from metta_core.errors import MettaError

from bridges.torchrl.layout import check_batch_time, metta_rewards_dones, read_bt


class MettaAdvantage(ValueEstimatorBase):
    """Metta's V-trace-clipped GAE with importance ratio 1, on TorchRL ``[B, T]`` batches.

    Reads ``value`` (``V(o_t)`` recorded at collection, ``[B, T]`` or ``[B, T, 1]``),
    ``("next", reward)`` and ``("next", terminated)`` (TorchRL's index: they follow ``action[t]``),
    maps them to Metta's layout (``bridges.torchrl.layout``: ``rewards[t+1] = next_reward[t]``)
    and calls :func:`metta_core.advantage.compute_advantage` with ``w = 1``::

        A[:, T-1] = 0;  for t = T-2 … 0:
            nnt  = 1 - next_terminated[t]
            A[t] = min(1, rho_clip) * (next_reward[t] + gamma * V[t+1] * nnt - V[t])
                   + gamma * gae_lambda * min(1, c_clip) * nnt * A[t+1]

    i.e. bootstrapping from the *next column*: truncation (``done & ~terminated``) is ignored
    and the last step of every row is not used (its advantage is 0), exactly as Metta does.
    Writes ``advantage`` and ``value_target = advantage + value`` with the shape of the value
    entry. If the value entry is missing and a ``value_network`` is given, the network fills it
    first (without grad, with ``params`` when given), as TorchRL's estimators do.
    """

    def __init__(
        self,
        *,
        gamma: float,
        gae_lambda: float,
        rho_clip: float = 1.0,
        c_clip: float = 1.0,
        value_network: TensorDictModule | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(value_network=value_network, device=device)
        self.gamma = float(gamma)
        self.gae_lambda = float(gae_lambda)
        self.rho_clip = float(rho_clip)
        self.c_clip = float(c_clip)

    def forward(
        self,
        tensordict: TensorDictBase,
        *,
        params: TensorDictBase | None = None,
        target_params: TensorDictBase | None = None,
    ) -> TensorDictBase:
        """Write ``advantage`` and ``value_target`` into ``tensordict`` (``[B, T]``, time last).

        ``target_params`` is accepted for the TorchRL estimator signature and unused: Metta's
        advantage reads no next-observation value.
        """
        who = type(self).__name__
        check_batch_time(tensordict, who)
        keys = self.tensor_keys
        if tensordict.get(keys.value, None) is None and self.value_network is not None:
            self._fill_values(tensordict, params)
        values = read_bt(tensordict, keys.value, field="value", who=who)
        next_reward = read_bt(tensordict, ("next", keys.reward), field="reward", who=who, configured=keys.reward)
        next_terminated = read_bt(
            tensordict, ("next", keys.terminated), field="terminated", who=who, configured=keys.terminated,
            float32=False,
        )
        rewards, dones = metta_rewards_dones(next_reward, next_terminated)
        adv = compute_advantage(
            values, rewards, dones, torch.ones_like(values),
            gamma=self.gamma, gae_lambda=self.gae_lambda, rho_clip=self.rho_clip, c_clip=self.c_clip,
        )
        value_shape = tensordict.get(keys.value).shape
        tensordict.set(keys.advantage, adv.reshape(value_shape))
        tensordict.set(keys.value_target, (adv + values).reshape(value_shape))
        return tensordict

    def _fill_values(self, tensordict: TensorDictBase, params: TensorDictBase | None) -> None:
        network = self.value_network
        missing = [k for k in network.in_keys if tensordict.get(k, None) is None]
        if missing:
            raise MettaError(
                f"{type(self).__name__}: no {self.tensor_keys.value!r} entry and the value network cannot "
                f"fill it: its inputs {missing} are missing too; record the value at collection (run the "
                f"critic in the collector policy) or provide the network inputs"
            )
        context = params.detach().to_module(network) if params is not None else nullcontext()
        with torch.no_grad(), context:
            out = network(tensordict.select(*network.in_keys))
        tensordict.set(self.tensor_keys.value, out.get(self.tensor_keys.value))
