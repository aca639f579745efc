"""What a policy must provide to the core loop, and a small actor-critic that provides it."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from metta_core.errors import MettaError
from metta_core.experience import ExperienceSpec, FieldSpec

OBS_KEY = "env_obs"


@runtime_checkable
class Policy(Protocol):
    """The policy contract of the core loop (Metta's ``metta.agent.policy.Policy``).

    ``forward(td, action=None)`` reads ``td["env_obs"]`` and writes, with the same batch shape:

    - ``"actions"``: a sampled action (only when ``action`` is None, i.e. during rollout),
    - ``"act_log_prob"``: log-probability of ``action`` (or of the sampled one),
    - ``"entropy"``: entropy of the action distribution,
    - ``"values"``: the critic's value estimate (float32).

    The batch shape says what ``td`` is. During rollout it is ``[agents]``: one env step, with
    ``dones``/``truncateds`` (the flags that led into this observation), ``training_env_ids``
    (which agents) and ``last_actions`` (each agent's previous action, from
    ``CoreTrainingLoop.add_last_action_to_td``). During training it is ``[rows, horizon]``: whole
    buffer rows holding the fields of ``get_agent_experience_spec``, with the stored ``actions``
    passed as ``action``. A feed-forward policy flattens the batch dims itself (``ActorCritic``
    does); a recurrent one keeps per-agent state in rollout (zeroed where ``dones or
    truncateds``, its input state written into ``td`` for the buffer) and unrolls the rows from
    the stored state (SPEC §6; ``metta_core.recurrent_policy.RecurrentActorCritic``).

    ``get_agent_experience_spec`` names the per-step inputs the policy needs stored in the
    buffer (at least ``env_obs``; a recurrent policy adds its state fields and the reset
    flags); ``reset_memory`` forgets every agent's rollout state (a no-op for feed-forward
    policies; the losses call it at each rollout start, as Metta's do). An optional integer
    attribute ``burn_in_steps`` makes PPO skip storing that many rollout steps.
    """

    def forward(self, td: TensorDict, action: Tensor | None = None) -> TensorDict: ...

    def get_agent_experience_spec(self) -> ExperienceSpec: ...

    def reset_memory(self) -> None: ...

    def parameters(self): ...


def orthogonal_linear(n_in: int, n_out: int, std: float) -> nn.Linear:
    """``nn.Linear`` with orthogonal weights of gain ``std`` and zero bias (CleanRL's init)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, 0.0)
    return layer


def mlp(n_in: int, hidden: Sequence[int], n_out: int, out_std: float) -> nn.Sequential:
    """Tanh MLP with orthogonal init (CleanRL's); ``hidden=()`` gives a linear map."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [orthogonal_linear(n_in, width, float(np.sqrt(2))), nn.Tanh()]
        n_in = width
    layers.append(orthogonal_linear(n_in, n_out, out_std))
    return nn.Sequential(*layers)


def categorical_terms(logits: Tensor, action: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(action, log_prob(action), entropy)`` of ``Categorical(logits=logits)`` over the last dim.

    With ``action=None`` an action is sampled (``torch.multinomial`` on the global RNG, one draw
    per row, as ``Categorical.sample`` does). The same tensor operations run in the same order
    as in ``torch.distributions.Categorical`` (so values, gradients and RNG draws are
    bit-identical), without building the distribution object and validating its arguments,
    which costs more than the math at rollout batch sizes::

        logits   = out - logsumexp(out)              log_prob = logits[action]
        probs    = softmax(logits)                   entropy  = -sum(max(logits, finfo.min) * probs)
    """
    logits = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = None
    if action is None:
        probs = torch.softmax(logits, dim=-1)
        action = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, True).reshape(probs.shape[:-1])
    log_prob = logits.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
    clamped = torch.clamp(logits, min=torch.finfo(logits.dtype).min)
    if probs is None:
        probs = torch.softmax(logits, dim=-1)
    entropy = -(clamped * probs).sum(-1)
    return action, log_prob, entropy


def diagonal_normal(mean: Tensor, log_std: Tensor) -> Distribution:
    """The ``Box`` action distribution: ``Normal(mean, exp(log_std))`` whose log-prob and entropy sum
    over the action dims."""
    return Independent(Normal(mean, log_std.exp().expand_as(mean)), 1)


def write_policy_outputs(
    td: TensorDict,
    batch: tuple[int, ...] | torch.Size,
    action_shape: tuple[int, ...],
    head_out: Tensor,
    values: Tensor,
    *,
    continuous: bool,
    log_std: Tensor | None = None,
    action: Tensor | None = None,
    who: str = "policy",
) -> TensorDict:
    """Write the ``Policy`` contract's outputs for flat head outputs ``[n, ...]`` over ``batch``.

    ``head_out`` are the logits (``Categorical``, through ``categorical_terms``) or, for ``Box``
    actions, the means of ``diagonal_normal`` (with ``log_std``); ``values`` the critic's ``[n, 1]`` or ``[n]``.
    With ``action=None`` an action is sampled and written to ``td["actions"]``; otherwise the given
    ``action`` (shape ``(*batch, *action_shape)``) is scored. Writes ``act_log_prob``, ``entropy``
    and ``values`` with shape ``batch``. An action outside the space is a ``MettaError``.
    """
    sampled = action is None
    if not sampled:
        if tuple(action.shape) != (*batch, *action_shape):
            raise MettaError(
                f"{who}: action has shape {tuple(action.shape)}, expected {(*batch, *action_shape)} "
                f"(the observation batch {tuple(batch)} times the action space's shape {action_shape})"
            )
        action = action.reshape(-1, *action_shape)
    try:
        if not continuous:  # Categorical's math without the distribution object (categorical_terms)
            action, log_prob, entropy = categorical_terms(head_out, action)
        else:
            dist = diagonal_normal(head_out, log_std)
            action = dist.sample() if sampled else action
            log_prob, entropy = dist.log_prob(action), dist.entropy()
    except (ValueError, RuntimeError, IndexError) as exc:  # outside the space: torch's support check,
        # or the index error of an out-of-range discrete action
        raise MettaError(
            f"{who}: the action {tuple(action.shape)} is outside the action space ({exc}); pass actions "
            f"sampled from this policy's action space"
        ) from None
    if sampled:
        td["actions"] = action.reshape(*batch, *action_shape)
    td["act_log_prob"] = log_prob.reshape(batch)
    td["entropy"] = entropy.reshape(batch)
    td["values"] = values.reshape(batch)
    return td


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs over a flat observation.

    Discrete action spaces get a ``Categorical``; ``Box`` spaces a diagonal ``Normal`` with a
    learned state-independent log-std (log-prob and entropy summed over action dims).
    """

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        if not isinstance(observation_space, gym.spaces.Box):
            raise MettaError(f"ActorCritic needs a Box observation space, got {observation_space}")
        self.obs_shape = tuple(observation_space.shape)
        self.obs_dim = obs_dim = int(np.prod(self.obs_shape))
        if isinstance(action_space, gym.spaces.Discrete):
            self.continuous = False
            self.action_shape: tuple[int, ...] = ()
            self.actor = mlp(obs_dim, hidden, int(action_space.n), 0.01)
        elif isinstance(action_space, gym.spaces.Box):
            self.continuous = True
            self.action_shape = tuple(action_space.shape)
            self.actor = mlp(obs_dim, hidden, int(np.prod(self.action_shape)), 0.01)
            self.log_std = nn.Parameter(torch.zeros(int(np.prod(self.action_shape))))
        else:
            raise MettaError(f"ActorCritic supports Discrete and Box action spaces, got {action_space}")
        self.critic = mlp(obs_dim, hidden, 1, 1.0)

    def forward(self, td: TensorDict, action: Tensor | None = None) -> TensorDict:
        obs = td[OBS_KEY]
        if tuple(obs.shape[obs.dim() - len(self.obs_shape):]) != self.obs_shape or obs.dim() < len(self.obs_shape):
            raise MettaError(
                f"ActorCritic: td[{OBS_KEY!r}] has shape {tuple(obs.shape)}, expected (*batch, {', '.join(map(str, self.obs_shape))}) "
                f"for the observation space of shape {self.obs_shape}; check the env or the policy's observation space"
            )
        batch = obs.shape[: obs.dim() - len(self.obs_shape)]
        flat_obs = obs.reshape(-1, self.obs_dim).float()
        return write_policy_outputs(
            td, batch, self.action_shape, self.actor(flat_obs), self.critic(flat_obs),
            continuous=self.continuous, log_std=getattr(self, "log_std", None), action=action, who="ActorCritic",
        )

    def get_agent_experience_spec(self) -> ExperienceSpec:
        return ExperienceSpec({OBS_KEY: FieldSpec(self.obs_shape, torch.float32)})

    def reset_memory(self) -> None:
        """Feed-forward: nothing to reset."""
