"""Framework runners: each module runs a ``Case`` through one framework and returns a ``Measurement``.

A runner module (``core``, ``torchrl``, ``rllib``) exposes ``run(case) -> Measurement``; it only
adapts the case to its framework's API and calls the framework's bridge. A runner that cannot run
every kind of case yet also exposes ``unsupported(case) -> str | None``: the reason it cannot run
``case`` (reported as ``UNSUPPORTED``, neither a pass nor a crash), or None. The helpers here are
the parts every runner shares: the case's gym spaces, an ``ActorCritic`` or
``RecurrentActorCritic`` with the case's weights, the case's optimizer, and the one-step
procedure of SPEC §4.8.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable

import gymnasium as gym
import numpy as np
import torch

from metta_core.errors import MettaError
from metta_core.policy import ActorCritic
from metta_core.recurrent_policy import RecurrentActorCritic

from bridges.conformance.cases import Case
from bridges.conformance.reference import Measurement

FRAMEWORKS = ("core", "torchrl", "rllib")
"""Runner names, in report order; ``bridges.conformance.runners.<name>`` implements each."""


class BridgeUnavailable(MettaError):
    """A framework's runner cannot be imported (the framework or its bridge is missing or broken)."""


def unsupported_features(case: Case, recurrent: bool, multi_agent: bool, last_action: bool = False,
                         last_action_why: str = "") -> str | None:
    """The capability check of a runner that supports recurrent policies (``recurrent``), the
    multi-agent layout (``multi_agent``) and policies conditioned on their last action
    (``last_action``; ``last_action_why`` says why not) or not: why it cannot run ``case`` yet, or None."""
    reasons = []
    if case.policy_kind != "mlp" and not recurrent:
        reasons.append(f"recurrent policies (policy.kind {case.policy_kind!r}, SPEC §6)")
    elif case.conditions_on_last_action and not last_action:
        reasons.append("policies conditioned on their last action (policy.condition_on_last_action"
                       + (f": {last_action_why})" if last_action_why else ")"))
    if case.agents > 1 and not multi_agent:
        reasons.append(f"the multi-agent layout (layout.agents = {case.agents}, rows env * agents + agent)")
    if not reasons:
        return None
    return " and ".join(reasons) + " not supported by this runner yet"


def load_runner(framework: str) -> ModuleType:
    """Import the runner of ``framework``; ``BridgeUnavailable`` says why it cannot run."""
    if framework not in FRAMEWORKS:
        raise MettaError(f"unknown framework {framework!r}; choose from {list(FRAMEWORKS)}")
    try:
        return importlib.import_module(f"bridges.conformance.runners.{framework}")
    except Exception as exc:  # any import failure means the bridge cannot be checked
        raise BridgeUnavailable(f"bridge unavailable: {type(exc).__name__}: {exc}") from exc


def spaces(case: Case) -> tuple[gym.spaces.Box, gym.spaces.Space]:
    """``(observation_space, action_space)`` of a case: unbounded ``Box`` obs, ``Discrete`` or ``Box`` actions."""
    policy = case.config["policy"]
    obs = gym.spaces.Box(-np.inf, np.inf, (policy["obs_dim"],), np.float32)
    action = policy["action"]
    if action["kind"] == "discrete":
        return obs, gym.spaces.Discrete(action["n"])
    return obs, gym.spaces.Box(-np.inf, np.inf, (action["dim"],), np.float32)


def actor_critic(case: Case) -> ActorCritic:
    """``ActorCritic`` with the case's hidden widths and initial weights (names must match exactly)."""
    policy = ActorCritic(*spaces(case), hidden=tuple(case.config["policy"]["hidden"]))
    policy.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in case.weights.items()}, strict=True)
    return policy


def recurrent_actor_critic(case: Case) -> RecurrentActorCritic:
    """``RecurrentActorCritic`` of a recurrent case (``policy.kind`` lstm/gru, ``hidden_size``,
    ``num_layers``, ``shared_core``, ``condition_on_last_action``) with its initial weights (names
    must match exactly)."""
    pol = case.config["policy"]
    policy = RecurrentActorCritic(*spaces(case), hidden_size=pol["hidden_size"], num_layers=pol["num_layers"],
                                  cell=pol["kind"], shared_core=pol["shared_core"],
                                  condition_on_last_action=case.conditions_on_last_action)
    policy.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in case.weights.items()}, strict=True)
    return policy


def case_policy(case: Case) -> ActorCritic | RecurrentActorCritic:
    """The case's policy with its initial weights: ``ActorCritic`` for ``policy.kind`` mlp, else
    ``RecurrentActorCritic``."""
    return actor_critic(case) if case.policy_kind == "mlp" else recurrent_actor_critic(case)


def optimizer(case: Case, params: Iterable[torch.nn.Parameter]) -> torch.optim.Adam:
    """The case's optimizer (Adam with its ``lr``, ``betas``, ``eps``)."""
    spec = case.config["optimizer"]
    return torch.optim.Adam(params, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"])


def snapshot(named: Iterable[tuple[str, torch.Tensor]], prefix: str = "") -> dict[str, np.ndarray]:
    """``{name: array}`` copies of named tensors, with ``prefix`` stripped from the names."""
    return {name.removeprefix(prefix): t.detach().cpu().numpy().copy() for name, t in named}


def one_step(loss: torch.Tensor, named_params: list[tuple[str, torch.nn.Parameter]], optimizers: list,
             max_grad_norm: float, prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SPEC §4.8 for one minibatch: zero_grad, backward, ``clip_grad_norm_``, step.

    Returns ``(grads before clipping, parameters after the step)``; a parameter without a
    gradient reports zeros.
    """
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    grads = {name.removeprefix(prefix): (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy()
             for name, p in named_params}
    torch.nn.utils.clip_grad_norm_([p for _, p in named_params], max_grad_norm)
    for opt in optimizers:
        opt.step()
    return grads, snapshot(named_params, prefix)


__all__ = ["FRAMEWORKS", "BridgeUnavailable", "Measurement", "actor_critic", "case_policy", "load_runner", "one_step",
           "optimizer", "recurrent_actor_critic", "snapshot", "spaces", "unsupported_features"]
