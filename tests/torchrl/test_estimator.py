"""MettaAdvantage: the SPEC §1 index shift, the loop reference and the identity with TorchRL's GAE."""

import numpy as np
import pytest
import torch
from torchrl.objectives.value import GAE

from bridges.torchrl import MettaAdvantage
from bridges.torchrl.layout import metta_rewards_dones
from metta_core.advantage import compute_advantage
from metta_core.errors import MettaError
from tests.reference import gae_loop
from tests.torchrl.helpers import make_batch, make_modules, metta_layout

GAMMA, LAMBDA = 0.977, 0.891477


def estimator(critic=None, **kw):
    return MettaAdvantage(gamma=GAMMA, gae_lambda=LAMBDA, value_network=critic, **kw)


def test_matches_core_on_hand_shifted_layout_and_writes_value_shape():
    batch = make_batch(*make_modules())
    estimator()(batch)
    values, rewards, dones = metta_layout(batch)
    expected = compute_advantage(values, rewards, dones, torch.ones_like(values), gamma=GAMMA, gae_lambda=LAMBDA)
    assert batch["advantage"].shape == batch["state_value"].shape == (4, 8, 1)
    assert torch.equal(batch["advantage"][..., 0], expected)
    assert torch.equal(batch["value_target"], batch["advantage"] + batch["state_value"])
    assert torch.all(batch["advantage"][:, -1] == 0)  # SPEC §2: the last column is 0


def test_matches_textbook_loop_in_torchrl_index():
    """gae_loop reads step t's reward/terminal at t (TorchRL's index), no shift involved."""
    batch = make_batch(*make_modules(), B=3, T=12, seed=5)
    estimator()(batch)
    ref = gae_loop(batch["state_value"][..., 0].numpy(), batch["next", "reward"][..., 0].numpy(),
                   batch["next", "terminated"][..., 0].float().numpy(), GAMMA, LAMBDA)
    np.testing.assert_allclose(batch["advantage"][..., 0].numpy(), ref, atol=1e-5)


def test_identity_with_torchrl_gae_on_all_but_the_last_step():
    """Without truncation, Metta's advantage on [B, T] equals TorchRL's GAE on the first T-1 steps
    whose next values are the next column's values (Metta never bootstraps past the row)."""
    batch = make_batch(*make_modules(), B=3, T=10, seed=2)
    batch["next", "done"] = batch["next", "terminated"].clone()
    estimator()(batch)
    head = batch[:, :-1].clone()
    head["next", "state_value"] = batch["state_value"][:, 1:]
    GAE(gamma=GAMMA, lmbda=LAMBDA, value_network=None)(head)
    assert torch.allclose(batch["advantage"][:, :-1], head["advantage"], atol=1e-5)


def test_shift_helper_drops_last_column_and_zeroes_first():
    r = torch.arange(6.0).reshape(2, 3)
    d = torch.tensor([[True, False, True], [False, True, False]])
    rewards, dones = metta_rewards_dones(r, d)
    assert torch.equal(rewards, torch.tensor([[0.0, 0.0, 1.0], [0.0, 3.0, 4.0]]))
    assert torch.equal(dones, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_fills_missing_values_with_the_network():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    batch.del_("state_value")
    estimator(critic)(batch)
    with torch.no_grad():
        expected = critic.module(batch["observation"])
    assert torch.equal(batch["state_value"], expected) and not batch["advantage"].requires_grad


def test_errors_name_the_key_and_the_fix():
    batch = make_batch(*make_modules())
    batch.del_("state_value")
    with pytest.raises(MettaError, match=r"'state_value'.*set_keys\(value="):
        estimator()(batch)
    with pytest.raises(MettaError, match=r"\[T, B\]"):
        estimator()(make_batch(*make_modules()).refine_names("time", None))
