"""TorchRL's recurrent modules (``LSTMModule`` / ``GRUModule``) under Metta's stored-state BPTT (SPEC §6).

TorchRL's pieces and SPEC §6, side by side (time index of SPEC §1; column ``t`` of a row holds
observation ``t``):

- ``is_init[t]`` (``InitTracker``) is set on the first step of an episode, i.e. after the previous
  step ended with ``done = terminated | truncated``: it is Metta's reset flag
  ``dones[t] or truncateds[t]`` (the flags that led into observation ``t``).
- The root ``recurrent_state_*[t]`` (written per step by the module's primer and the collector)
  is the module's input state at ``t``: the state it left at ``t - 1``, zeros after a reset (the
  primer resets it with the env). It is Metta's stored input state, stored with every step.
- In recurrent mode (which ``LossModule.forward`` sets) the module cuts each row at the columns
  with ``is_init`` and runs every piece from the stored state of its first column. That is SPEC
  §6's unroll (start from the stored state of column 0, zero the state at every reset column)
  provided the stored state is zero where ``is_init`` is set: :func:`prepare_rows` zeroes it
  there, so a hand-built batch gets SPEC §6's numbers too. Gradients flow through each piece and
  not into the stored state (TorchRL's stored states are collected without gradient).

Where the numbers differ from Metta's trainer: TorchRL's ``Collector`` carries each env's state
across batches, while Metta zeroes every agent's state when a rollout starts
(``on_rollout_start`` -> ``reset_memory``). :func:`zero_carried_state` reproduces Metta's rule
between batches (``bridges.torchrl.train`` calls it); a plain collector loop without it trains on
the carried states (still SPEC §6 in training: the rows start from whatever state was stored).

This module maps layouts and checks inputs; the cell math is ``torch.nn.LSTM`` / ``torch.nn.GRU``.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictSequential
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.envs import InitTracker, TransformedEnv
from torchrl.modules import GRUModule, IndependentNormal, LSTMModule, ProbabilisticActor

from metta_core.errors import MettaError
from metta_core.recurrent_policy import LAST_ACTIONS_KEY, STATE_KEYS, RecurrentActorCritic

from bridges.torchrl.last_action import LastAction, LastActionEncoder

__all__ = [
    "TRAJ_IDS", "Concat", "NormalHead", "add_recurrent_transforms", "from_recurrent_actor_critic", "prepare_rows",
    "recurrent_modules", "state_keys", "zero_carried_state",
]

RecurrentModule = LSTMModule | GRUModule

TRAJ_IDS = ("collector", "traj_ids")
"""The collector's per-step trajectory id: changes only where a new episode starts (``is_init``)."""


def recurrent_modules(*networks: nn.Module) -> list[RecurrentModule]:
    """Every ``LSTMModule`` / ``GRUModule`` inside ``networks``, each once (a backbone shared by
    the actor and the critic is listed once)."""
    found: dict[int, RecurrentModule] = {}
    for network in networks:
        for module in network.modules():
            if isinstance(module, (LSTMModule, GRUModule)):
                found.setdefault(id(module), module)
    return list(found.values())


def state_keys(module: RecurrentModule) -> list[NestedKey]:
    """The stored-state keys the module reads (``(h, c)`` of an LSTM, ``(h,)`` of a GRU)."""
    return list(module.in_keys[1:-1])


def _is_init_key(module: RecurrentModule) -> NestedKey:
    return module.in_keys[-1]


def _state_shapes(module: RecurrentModule) -> list[tuple[int, int]]:
    """``[layers * directions, size]`` of each stored state, as the module's primer writes them."""
    rnn = module.lstm if isinstance(module, LSTMModule) else module.gru
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    if isinstance(module, LSTMModule):
        return [(layers, rnn.proj_size or rnn.hidden_size), (layers, rnn.hidden_size)]
    return [(layers, rnn.hidden_size)]


def _fix(module: RecurrentModule) -> str:
    return (
        f"build the env as TransformedEnv(env, InitTracker()) with module.make_tensordict_primer() appended "
        f"for this {type(module).__name__} (add_recurrent_transforms does both), and keep the collected "
        f"entries in the batch"
    )


def prepare_rows(td: TensorDictBase, modules: list[RecurrentModule], who: str) -> TensorDictBase:
    """Check a ``[B, T]`` batch for ``modules`` and return it (a shallow copy) with every stored state
    zeroed where ``is_init`` is set (SPEC §6: a reset column starts from zeros).

    Raises a ``MettaError`` naming the key and the fix when: a stored state or ``is_init`` is
    missing; a stored state is not ``[B, T, layers, hidden]`` for its module; a row crosses from
    one trajectory to another without ``is_init`` (``("collector", "traj_ids")`` changes), which
    happens when the rows were cut with a horizon that does not divide each env's steps.
    """
    bt = tuple(td.batch_size)
    out = td.copy()
    for module in modules:
        init_key = _is_init_key(module)
        is_init = td.get(init_key, None)
        if is_init is None:
            raise MettaError(
                f"{who}: the batch has no {init_key!r} entry, which {type(module).__name__} reads to reset its "
                f"state at episode starts (Metta's dones or truncateds, SPEC §6); {_fix(module)}"
            )
        if tuple(is_init.shape) not in (bt, bt + (1,)):
            raise MettaError(f"{who}: {init_key!r} has shape {tuple(is_init.shape)}, expected {bt} or {bt + (1,)}")
        reset = is_init.reshape(*bt, 1, 1).bool()
        for key, (layers, size) in zip(state_keys(module), _state_shapes(module)):
            state = td.get(key, None)
            expected = (*bt, layers, size)
            if state is None:
                raise MettaError(
                    f"{who}: the batch has no stored state {key!r} of {type(module).__name__} (its input state at "
                    f"each step, SPEC §6; without it the module would silently start every row from zeros); "
                    f"{_fix(module)}"
                )
            if tuple(state.shape) != expected:
                raise MettaError(
                    f"{who}: stored state {key!r} has shape {tuple(state.shape)}, expected [B, T, layers, hidden] = "
                    f"{expected} for {type(module).__name__}(num_layers x directions={layers}, hidden={size}); "
                    f"the batch was collected with another module (or a primer of another size): collect it with "
                    f"this module's make_tensordict_primer()"
                )
            out.set(key, state.masked_fill(reset, 0.0))
        _check_rows_follow_trajectories(td, is_init.reshape(bt).bool(), who)
    return out


def _check_rows_follow_trajectories(td: TensorDictBase, is_init: Tensor, who: str) -> None:
    traj = td.get(TRAJ_IDS, None)
    if traj is None or td.batch_size[1] < 2:
        return
    traj = traj.reshape(td.batch_size)
    jumps = (traj[:, 1:] != traj[:, :-1]) & ~is_init[:, 1:]
    if bool(jumps.any()):
        row, col = (int(i) for i in torch.nonzero(jumps)[0])
        raise MettaError(
            f"{who}: row {row} jumps from trajectory {int(traj[row, col])} to {int(traj[row, col + 1])} at column "
            f"{col + 1} with no is_init there: the rows are not consecutive steps of one env, so the recurrent state "
            f"would carry over from another env. The horizon T={td.batch_size[1]} must divide the steps each env "
            f"collected: for a [num_envs, S] batch use data.reshape(-1, T) with S % T == 0 (frames_per_batch = "
            f"num_envs x a multiple of bptt_horizon)"
        )


def add_recurrent_transforms(env: TransformedEnv, *networks: nn.Module) -> TransformedEnv:
    """Append ``InitTracker`` and the primer of every recurrent module in ``networks`` to ``env``, and
    ``LastAction`` when a network reads the last action (``LastActionEncoder``)."""
    env.append_transform(InitTracker())
    for module in recurrent_modules(*networks):
        env.append_transform(module.make_tensordict_primer())
    last_action_keys = {
        key for network in networks for module in network.modules()
        if isinstance(module, TensorDictModule) and isinstance(module.module, LastActionEncoder)
        for key in module.in_keys[1:]
    }
    for key in sorted(last_action_keys, key=str):
        env.append_transform(LastAction(out_key=key))
    return env


def zero_carried_state(collector: Any, modules: list[RecurrentModule]) -> None:
    """Zero the recurrent state a ``Collector`` carries into its next batch (Metta's
    ``on_rollout_start`` -> ``reset_memory``): the next batch's first step of every env starts from
    zeros and stores zeros. Uses ``Collector._carrier`` (TorchRL 0.14 has no public handle on it)."""
    carrier = collector._carrier
    for module in modules:
        for key in state_keys(module):
            state = carrier.get(key, None)
            if state is None:
                raise MettaError(f"zero_carried_state: the collector carries no {key!r}; {_fix(module)}")
            state.zero_()


class Concat(nn.Module):
    """``cat(inputs, dim=-1)``: the encoder output beside the cell output (``RecurrentTrunk``'s features)."""

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.cat(inputs, dim=-1)


class NormalHead(nn.Module):
    """``features -> (loc, scale)``: the core's actor head and ``scale = exp(log_std)`` (``diagonal_normal``)."""

    def __init__(self, head: nn.Module, log_std: nn.Parameter) -> None:
        super().__init__()
        self.head = head
        self.log_std = log_std

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        loc = self.head(features)
        return loc, self.log_std.exp().expand_as(loc)


def _batch_first_view(cell: nn.RNNBase) -> nn.RNNBase:
    """A ``batch_first=True`` cell (what TorchRL's modules require) holding ``cell``'s parameters
    (the same tensors: ``RNNBase.__setattr__`` keeps its flat weights in sync)."""
    kind = nn.LSTM if isinstance(cell, nn.LSTM) else nn.GRU
    view = kind(cell.input_size, cell.hidden_size, cell.num_layers, batch_first=True)
    for name in cell._flat_weights_names:
        setattr(view, name, getattr(cell, name))
    return view


def from_recurrent_actor_critic(
    core: RecurrentActorCritic, action_spec: Any = None, *, observation_key: NestedKey = "observation",
    last_action_key: NestedKey = LAST_ACTIONS_KEY,
) -> tuple[ProbabilisticActor, TensorDictModuleBase]:
    """A TorchRL actor and critic with exactly ``core``'s architecture, holding ``core``'s parameters.

    Per trunk (``core.trunks``: one shared, or ``actor_`` / ``critic_``)::

        encoded  = encoder(observation)                        Linear + Tanh
                   (encoder(cat([observation, one_hot(last_actions)])) when ``core`` conditions on
                   its last action: ``LastActionEncoder`` reading ``last_action_key``)
        cell_out = LSTMModule/GRUModule(encoded, stored state)  state keys = the core's buffer fields
        features = cat([encoded, cell_out])

    then the core's heads: a ``Categorical`` over ``logits = actor(features)`` (``Discrete``) or an
    ``IndependentNormal(actor(features), exp(log_std))`` (``Box``), and ``state_value =
    critic(features)``. With a shared trunk the critic is the head alone and reads the actor
    trunk's ``features`` (TorchRL's ``ActorValueOperator`` pattern; ``MettaPPOLoss`` feeds it what
    the actor wrote). The modules hold the same parameter tensors as ``core`` (training either
    trains both); they run one step at a time in a collector and in recurrent mode in the loss.
    """
    num_actions = None if core.continuous else int(core.action_space.n)
    trunks = []
    for trunk in core.trunks:
        keys = list(trunk.state_keys)
        wrapper = LSTMModule if isinstance(trunk.core, nn.LSTM) else GRUModule
        cell_name = "lstm" if wrapper is LSTMModule else "gru"
        prefix = keys[0][: -len(STATE_KEYS[cell_name][0])]  # "actor_" / "critic_", or "" for a shared trunk
        if core.condition_on_last_action:
            encoder = TensorDictModule(LastActionEncoder(trunk.encoder, num_actions),
                                       in_keys=[observation_key, last_action_key], out_keys=[f"{prefix}encoded"])
        else:
            encoder = TensorDictModule(trunk.encoder, in_keys=[observation_key], out_keys=[f"{prefix}encoded"])
        modules = [
            encoder,
            wrapper(**{cell_name: _batch_first_view(trunk.core)}, in_keys=[f"{prefix}encoded", *keys],
                    out_keys=[f"{prefix}cell_out", *(("next", k) for k in keys)]),
            TensorDictModule(Concat(), in_keys=[f"{prefix}encoded", f"{prefix}cell_out"], out_keys=[f"{prefix}features"]),
        ]
        trunks.append((prefix, modules))
    actor_prefix, actor_trunk = trunks[0]
    critic_prefix, critic_trunk = trunks[-1]
    features = f"{actor_prefix}features"
    if core.continuous:
        head = TensorDictModule(NormalHead(core.actor, core.log_std), in_keys=[features], out_keys=["loc", "scale"])
        dist: dict[str, Any] = {"in_keys": ["loc", "scale"], "distribution_class": IndependentNormal}
    else:
        head = TensorDictModule(core.actor, in_keys=[features], out_keys=["logits"])
        dist = {"in_keys": ["logits"], "distribution_class": torch.distributions.Categorical}
    actor = ProbabilisticActor(TensorDictSequential(*actor_trunk, head), spec=action_spec, return_log_prob=True, **dist)
    value_head = TensorDictModule(core.critic, in_keys=[f"{critic_prefix}features"], out_keys=["state_value"])
    critic = value_head if len(trunks) == 1 else TensorDictSequential(*critic_trunk, value_head)
    return actor, critic
