"""TorchRL runner: ``bridges.torchrl.MettaPPOLoss`` on ``[B, T]`` tensordicts, ``MettaSegmentSampler`` for the phase.

Layout (SPEC §1): TorchRL's ``("next", "reward")[:, t]`` is the case's ``rewards[:, t+1]`` (and
likewise ``terminated`` from ``dones``, ``truncated`` from ``truncateds``). TorchRL's last column
has no Metta counterpart; it is filled with ``UNUSED_LAST_REWARD`` and a terminal flag, which a
conforming loss never reads.

Multi-agent cases (``layout.agents = A``) are fed in TorchRL's group layout: every entry under the
group ``"agents"`` with batch ``[envs, horizon, A]`` (``group[e, :, a]`` is the case's row
``e * A + a``), the env's shared flags at the root, and the loss keys pointed at the group, as a
PettingZoo or VMAS pipeline has them; the bridge folds the agents back into the case's rows.

Recurrent cases (SPEC §6) run through ``LSTMModule`` / ``GRUModule`` networks holding the case's
``RecurrentActorCritic`` parameters (``bridges.torchrl.recurrent.from_recurrent_actor_critic``):
the stored states are the case's ``data/<state key>`` entries and ``is_init[:, t]`` is the case's
``dones[:, t] or truncateds[:, t]`` (InitTracker's flag, column 0 included). A policy conditioned
on its last action reads the case's ``last_actions`` under the same key (what the bridge's
``LastAction`` transform writes during collection).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import IndependentNormal, ProbabilisticActor, ValueOperator

from bridges.torchrl import MettaPPOLoss, MettaPPOPhase, MettaSegmentSampler, as_rows
from bridges.torchrl.recurrent import from_recurrent_actor_critic

from bridges.conformance.cases import Case
from bridges.conformance.reference import PHASE_STAT_NAMES, Measurement
from bridges.conformance.runners import (
    actor_critic, one_step, optimizer, recurrent_actor_critic, snapshot, unsupported_features,
)

UNUSED_LAST_REWARD = 123.0
"""Reward placed after the last action of every row; Metta never reads it (SPEC §1)."""

LOSS_KEYS = ("loss_objective", "loss_critic", "loss_entropy")

GROUP = "agents"
"""The agent group of a multi-agent case's batch (TorchRL's group layout)."""
FLAGS = ("terminated", "truncated", "done")


def unsupported(case: Case) -> str | None:
    """Why this runner cannot run ``case`` yet, or None: it runs recurrent policies (also conditioned on
    their last action) and the multi-agent group layout."""
    return unsupported_features(case, recurrent=True, multi_agent=True, last_action=True)


class _NormalHead(nn.Module):
    """``obs -> (loc, scale)`` sharing the ``ActorCritic``'s actor MLP and ``log_std`` parameters."""

    def __init__(self, actor: nn.Module, log_std: nn.Parameter) -> None:
        super().__init__()
        self.actor = actor
        self.log_std = log_std

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.actor(obs)
        return loc, self.log_std.exp().expand_as(loc)


def _key(name: str, grouped: bool) -> str | tuple[str, str]:
    return (GROUP, name) if grouped else name


def policy_modules(case: Case) -> tuple[ProbabilisticActor, ValueOperator, nn.Module]:
    """TorchRL actor and critic holding the parameters of a fresh ``ActorCritic`` (also returned),
    or for a recurrent case of its ``RecurrentActorCritic`` (``from_recurrent_actor_critic``).

    Discrete: ``Categorical`` over the actor's ``logits``; continuous: ``IndependentNormal`` with
    ``loc`` the actor's output and ``scale = exp(log_std)``. The critic writes ``state_value``.
    A multi-agent case's modules read and write those keys under ``GROUP``.
    """
    if case.policy_kind != "mlp":
        policy = recurrent_actor_critic(case)
        return (*from_recurrent_actor_critic(policy), policy)
    policy = actor_critic(case)
    grouped = case.agents > 1
    obs, action, value = (_key(name, grouped) for name in ("observation", "action", "state_value"))
    if policy.continuous:
        params = [_key("loc", grouped), _key("scale", grouped)]
        head = TensorDictModule(_NormalHead(policy.actor, policy.log_std), in_keys=[obs], out_keys=params)
        actor = ProbabilisticActor(head, in_keys=params, out_keys=[action], distribution_class=IndependentNormal,
                                   return_log_prob=True)
    else:
        logits = _key("logits", grouped)
        head = TensorDictModule(policy.actor, in_keys=[obs], out_keys=[logits])
        actor = ProbabilisticActor(head, in_keys=[logits], out_keys=[action],
                                   distribution_class=torch.distributions.Categorical, return_log_prob=True)
    return actor, ValueOperator(policy.critic, in_keys=[obs], out_keys=[value]), policy


def _loss(case: Case) -> tuple[MettaPPOLoss, nn.Module]:
    """``MettaPPOLoss`` over ``policy_modules(case)``, and the ``ActorCritic`` whose parameters it trains;
    for a multi-agent case the keys point at the group, as in TorchRL's MAPPO example."""
    actor, critic, policy = policy_modules(case)
    loss = MettaPPOLoss(actor, critic, case.ppo)
    if case.agents > 1:
        loss.set_keys(reward=(GROUP, "reward"), terminated=(GROUP, "terminated"), done=(GROUP, "done"),
                      value=(GROUP, "state_value"))
    return loss, policy


def _batch(case: Case, loss: MettaPPOLoss) -> TensorDict:
    """The case buffer as a collected TorchRL batch: ``[segments, horizon]``, or for a multi-agent
    case the group layout ``[envs, horizon]`` (``_group_layout``)."""
    rows = _rows(case, loss.tensor_keys, grouped=case.agents > 1)
    return rows if case.agents == 1 else _group_layout(rows, case.agents)


def _group_layout(rows: TensorDict, agents: int) -> TensorDict:
    """Rows ``e * agents + a`` (entries under ``GROUP`` and ``("next", GROUP)``) as TorchRL's group
    layout: the same keys with batch ``[envs, horizon, agents]``, ``group[e, :, a] = rows[e * agents + a]``;
    the env's flags (equal for its agents in a multi-agent case) also at the root, as the env's own."""
    envs, horizon = rows.batch_size[0] // agents, rows.batch_size[1]

    def unfold(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(envs, agents, horizon, *x.shape[2:]).transpose(1, 2)

    per_agent = [envs, horizon, agents]
    group = TensorDict({GROUP: TensorDict({}, per_agent), "next": {GROUP: TensorDict({}, per_agent)}}, [envs, horizon])
    for key, x in rows.items(include_nested=True, leaves_only=True):
        group.set(key, unfold(x))
    for name in FLAGS:
        group.set(("next", name), rows["next", GROUP, name][::agents])
    return group


def _rows(case: Case, keys: MettaPPOLoss._AcceptedKeys, grouped: bool) -> TensorDict:
    """The case buffer as ``[segments, horizon]`` rows under ``keys`` (the observation and truncation
    flag under ``GROUP`` when ``grouped``)."""
    data = case.tensors()
    next_reward = torch.full_like(data["rewards"], UNUSED_LAST_REWARD)
    next_reward[:, :-1] = data["rewards"][:, 1:]
    terminated = torch.ones_like(data["dones"], dtype=torch.bool)
    terminated[:, :-1] = data["dones"][:, 1:].bool()
    truncated = torch.zeros_like(terminated)
    truncated[:, :-1] = data["truncateds"][:, 1:].bool()
    recurrent = {}
    if case.policy_kind != "mlp":
        recurrent = {key: data[key] for key in case.policy_keys}
        recurrent["is_init"] = (data["dones"].bool() | data["truncateds"].bool()).unsqueeze(-1)
    return TensorDict(
        {
            **recurrent,
            _key("observation", grouped): data["env_obs"],
            keys.action: data["actions"],
            keys.sample_log_prob: data["act_log_prob"],
            keys.value: data["values"].unsqueeze(-1),
            "next": {keys.reward: next_reward.unsqueeze(-1), keys.terminated: terminated.unsqueeze(-1),
                     _key("truncated", grouped): truncated.unsqueeze(-1),
                     keys.done: (terminated | truncated).unsqueeze(-1)},
        },
        batch_size=list(data["values"].shape),
    )


def _terms(out: TensorDict) -> dict[str, float]:
    names = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "importance", "current_logprobs")
    return {"loss": float(sum(out[k] for k in LOSS_KEYS).detach()), **{k: float(out[k]) for k in names}}


def run(case: Case) -> Measurement:
    """The one-minibatch check on rows ``case.idx`` and a whole training phase through the sampler."""
    ppo, trainer = case.ppo, case.trainer
    loss, policy = _loss(case)
    batch = _batch(case, loss)
    minibatch = as_rows(batch, "conformance")[torch.from_numpy(case.idx)]  # the case's rows (agents folded)
    minibatch.set(loss.tensor_keys.priority_weight,
                  torch.from_numpy(case.prio_weights.copy()).expand(-1, trainer.bptt_horizon).contiguous())
    out = loss(minibatch)
    grads, after_step = one_step(sum(out[k] for k in LOSS_KEYS), list(policy.named_parameters()),
                                 [optimizer(case, loss.parameters())], ppo.max_grad_norm)

    loss, policy = _loss(case)
    sampler = MettaSegmentSampler(loss, minibatch_segments=trainer.sizes["minibatch_segments"],
                                  total_timesteps=trainer.total_timesteps, update_epochs=trainer.update_epochs,
                                  generator=torch.Generator().manual_seed(case.config["sample_seed"]))
    train_phase = MettaPPOPhase(loss, optimizer(case, loss.parameters()), sampler,
                                accumulate_minibatches=trainer.sizes["accumulate_minibatches"],
                                max_grad_norm=ppo.max_grad_norm)
    stats = train_phase(_batch(case, loss), epoch=case.config["trainer_epoch"])
    return Measurement(terms=_terms(out), grads=grads, params_after_step=after_step,
                       phase_stats={k: stats[k] for k in PHASE_STAT_NAMES if k in stats},
                       params_after_phase=snapshot(policy.named_parameters()))
