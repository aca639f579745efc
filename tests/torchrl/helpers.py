"""Small actor/critic and a synthetic collected batch for the TorchRL bridge tests."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import ProbabilisticActor, ValueOperator

OBS, ACTIONS = 3, 3


def make_modules(seed: int = 0, value_key: str = "state_value", log_prob_key: str | None = None):
    """A Categorical actor and a critic (tanh MLPs) with fixed weights."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(OBS, 16), nn.Tanh(), nn.Linear(16, ACTIONS))
    extra = {"log_prob_key": log_prob_key} if log_prob_key else {}
    actor = ProbabilisticActor(
        TensorDictModule(body, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], distribution_class=torch.distributions.Categorical, return_log_prob=True, **extra,
    )
    critic = ValueOperator(
        nn.Sequential(nn.Linear(OBS, 16), nn.Tanh(), nn.Linear(16, 1)), in_keys=["observation"], out_keys=[value_key]
    )
    return actor, critic


def make_batch(actor, critic, B: int = 4, T: int = 8, seed: int = 1, log_prob_key: str = "action_log_prob",
               value_key: str = "state_value", reward_key: str = "reward") -> TensorDict:
    """A ``[B, T]`` batch as a collector writes it, with a behaviour policy slightly off the actor.

    Terminal and truncation flags are sprinkled in; values are the critic's plus noise.
    """
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, T, OBS, generator=g)
    with torch.no_grad():
        logits = actor.module[0](TensorDict({"observation": obs}, [B, T]))["logits"]
        behaviour = torch.distributions.Categorical(logits=logits + 0.3 * torch.randn(logits.shape, generator=g))
        action = behaviour.sample()
        values = critic(TensorDict({"observation": obs}, [B, T]))[critic.out_keys[0]]
        values = values + 0.2 * torch.randn(values.shape, generator=g)
    terminated = torch.rand(B, T, 1, generator=g) < 0.15
    truncated = (torch.rand(B, T, 1, generator=g) < 0.05) & ~terminated
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            log_prob_key: behaviour.log_prob(action),
            value_key: values,
            "next": {
                "observation": torch.randn(B, T, OBS, generator=g),
                reward_key: torch.randn(B, T, 1, generator=g),
                "terminated": terminated,
                "truncated": truncated,
                "done": terminated | truncated,
            },
        },
        batch_size=[B, T],
    )


def metta_layout(batch: TensorDict, reward_key: str = "reward", value_key: str = "state_value"):
    """SPEC §1 by hand: ``rewards[:, t+1] = next_reward[:, t]``, ``dones`` likewise, column 0 zero."""
    B, T = batch.batch_size
    rewards = torch.zeros(B, T)
    dones = torch.zeros(B, T)
    rewards[:, 1:] = batch["next", reward_key][:, :-1, 0]
    dones[:, 1:] = batch["next", "terminated"][:, :-1, 0].float()
    return batch[value_key][..., 0], rewards, dones
