"""Recurrent policies in the TorchRL bridge (SPEC §6): LSTMModule / GRUModule under MettaPPOLoss.

The TorchRL modules are built from the core's ``RecurrentActorCritic`` (same weights), so every
number is checked against the core's own training forward on the same rows: log-probs, entropy,
values, and the loss terms of ``ppo_minibatch_loss`` with their gradients.
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from bridges.torchrl.layout import TIME_DIM_NAME
from bridges.torchrl.loss import MettaPPOLoss
from bridges.torchrl.recurrent import from_recurrent_actor_critic, prepare_rows, recurrent_modules
from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import ppo_minibatch_loss
from metta_core.recurrent_policy import RecurrentActorCritic

OBS, ACTIONS, HIDDEN = 4, 3, 8
B, T = 5, 7


def make_core(cell: str = "lstm", shared: bool = False, layers: int = 1, seed: int = 0) -> RecurrentActorCritic:
    torch.manual_seed(seed)
    return RecurrentActorCritic(
        gym.spaces.Box(-1, 1, (OBS,)), gym.spaces.Discrete(ACTIONS), HIDDEN, num_layers=layers, cell=cell,
        shared_core=shared,
    )


def make_rows(core: RecurrentActorCritic, resets: torch.Tensor, seed: int = 1) -> tuple[TensorDict, TensorDict]:
    """The same ``[B, T]`` rows in the core's layout and in TorchRL's (``is_init`` = ``dones or truncateds``).

    Stored states are random and nonzero everywhere, also at reset columns (SPEC §6 zeroes them there)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, T, OBS, generator=g)
    action = torch.randint(0, ACTIONS, (B, T), generator=g)
    states = {k: torch.randn(B, T, *core.state_shape, generator=g) for k in core.state_keys}
    dones = (resets & (torch.rand(B, T, generator=g) < 0.5)).float()
    truncateds = (resets & (dones == 0)).float()
    core_rows = TensorDict({"env_obs": obs, "dones": dones, "truncateds": truncateds, **states}, [B, T])
    next_terminated = torch.zeros(B, T, 1, dtype=torch.bool)
    next_terminated[:, :-1, 0] = dones[:, 1:].bool()
    next_truncated = torch.zeros(B, T, 1, dtype=torch.bool)
    next_truncated[:, :-1, 0] = truncateds[:, 1:].bool()
    torchrl_rows = TensorDict(
        {
            "observation": obs, "action": action, "is_init": resets.unsqueeze(-1), **states,
            "action_log_prob": torch.randn(B, T, generator=g) * 0.1 - 1.1,
            "state_value": torch.randn(B, T, 1, generator=g),
            "next": {
                "reward": torch.randn(B, T, 1, generator=g), "terminated": next_terminated,
                "truncated": next_truncated, "done": next_terminated | next_truncated,
            },
        },
        [B, T],
    )
    torchrl_rows.names = [None, TIME_DIM_NAME]
    return core_rows, torchrl_rows


RESETS = {
    "none": torch.zeros(B, T, dtype=torch.bool),
    "column_0": torch.zeros(B, T, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
    "mid_row": torch.tensor([[0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1],
                             [0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool),
    "every_column": torch.ones(B, T, dtype=torch.bool),
}


@pytest.mark.parametrize("resets", list(RESETS), ids=list(RESETS))
@pytest.mark.parametrize("cell,shared,layers", [("lstm", False, 1), ("gru", False, 1), ("lstm", True, 1), ("gru", True, 2)])
def test_modules_reproduce_the_core_training_forward(cell, shared, layers, resets):
    core = make_core(cell, shared, layers)
    actor, critic = from_recurrent_actor_critic(core)
    core_rows, rows = make_rows(core, RESETS[resets])
    expected = core(core_rows.clone(), action=rows["action"])
    prepared = prepare_rows(rows, recurrent_modules(actor, critic), "test")
    with set_recurrent_mode(True):
        out = actor(prepared.clone())
        dist = actor.get_dist(prepared.clone())
        values = critic(out)["state_value"].squeeze(-1)
    torch.testing.assert_close(dist.log_prob(rows["action"]), expected["act_log_prob"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist.entropy(), expected["entropy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, expected["values"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_backbone"])
def test_loss_terms_and_gradients_equal_the_core(shared):
    core = make_core("lstm", shared)
    actor, critic = from_recurrent_actor_critic(core)
    core_rows, rows = make_rows(core, RESETS["mid_row"])
    cfg = PPOConfig()
    loss = MettaPPOLoss(actor, critic, cfg)
    out = loss(rows)
    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
    total.backward()

    # the core: the policy's training forward, then ppo_minibatch_loss on Metta's layout
    with torch.no_grad():
        first = MettaPPOLoss(actor, critic, cfg)
        first_rows = rows.clone()
        first.first_pass(first_rows)
    expected = core(core_rows.clone(), action=rows["action"])
    rewards = torch.zeros(B, T)
    rewards[:, 1:] = rows["next", "reward"][:, :-1, 0]
    dones = core_rows["dones"].clone()
    dones[:, 0] = 0
    terms = ppo_minibatch_loss(
        cfg, old_logprob=rows["action_log_prob"], new_logprob=expected["act_log_prob"], entropy=expected["entropy"],
        new_values=expected["values"], values=rows["state_value"][..., 0], rewards=rewards, dones=dones,
        advantages=first_rows["advantage"][..., 0],
    )
    torch.testing.assert_close(out["policy_loss"], terms.policy_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["value_loss"], terms.value_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["entropy"], terms.entropy.detach(), rtol=1e-5, atol=1e-6)
    (terms.policy_loss + terms.value_term + terms.entropy_term).backward()
    core_grads = {name: p.grad for name, p in core.named_parameters() if p.grad is not None}
    cell = core.trunks[0].core
    torchrl_cell = recurrent_modules(actor)[0].lstm
    for name, _ in cell.named_parameters():
        torch.testing.assert_close(
            getattr(torchrl_cell, name).grad if not loss.functional else _functional_grad(loss, name),
            core_grads[f"trunks.0.core.{name}"], rtol=1e-4, atol=1e-6,
        )


def _functional_grad(loss: MettaPPOLoss, name: str) -> torch.Tensor:
    """The gradient of the actor trunk's cell parameter ``name`` held by the functional loss."""
    for key, p in loss.actor_network_params.items(True, True):
        key = key if isinstance(key, tuple) else (key,)
        if key[-1] == name and "lstm" in key:
            return p.grad
    raise KeyError(name)
