"""The reference's recurrent forward (gate equations written out, one row and one column at a time)
against ``metta_core``'s ``RecurrentActorCritic`` (``nn.LSTM``/``nn.GRU``, fused unroll): two
independent implementations of SPEC §6 that must agree on random inputs, values and gradients
(float32: the policy casts its observations to float32), also when the policy reads its last
action (the reference's written-out one-hot against the core's ``with_last_action``)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from bridges.conformance import reference
from bridges.conformance.cases import CASES_DIR, load_case, parameter_shapes
from metta_core.recurrent_policy import RecurrentActorCritic

ROWS, HORIZON, OBS_DIM, HIDDEN = 5, 7, 3, 6


def _policy_block(cell: str, shared: bool, layers: int, action: dict, last_action: bool = False) -> dict:
    block = {"architecture": "recurrent_actor_critic", "kind": cell, "obs_dim": OBS_DIM, "hidden_size": HIDDEN,
             "num_layers": layers, "shared_core": shared, "action": action}
    if last_action:
        block["condition_on_last_action"] = True
    return block


def _inputs(block: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 rows: resets at column 0 (row 0), mid-row, in runs, every column (row 1), none (row 4);
    random last actions (independent of the actions) when the policy conditions on them."""
    st = (ROWS, HORIZON)
    dones = (torch.rand(st, generator=gen) < 0.2).float()
    truncateds = (torch.rand(st, generator=gen) < 0.1).float()
    dones[0, 0] = 1.0
    dones[1] = 1.0
    dones[2, 2:5] = 1.0
    truncateds[3, 0] = truncateds[3, 4] = 1.0
    dones[4] = truncateds[4] = 0.0
    action = block["action"]
    if action["kind"] == "discrete":
        actions = torch.randint(0, action["n"], st, generator=gen)
    else:
        actions = torch.randn(*st, action["dim"], generator=gen)
    rows = {"env_obs": torch.randn(*st, OBS_DIM, generator=gen), "actions": actions,
            "dones": dones, "truncateds": truncateds}
    for key in reference.state_keys(block):
        rows[key] = torch.randn(*st, block["num_layers"], HIDDEN, generator=gen)
    if reference.conditions_on_last_action(block):
        rows["last_actions"] = (torch.randint(0, action["n"], st, generator=gen) if action["kind"] == "discrete"
                                else torch.randn(*st, action["dim"], generator=gen))
    return rows


def _core(block: dict, params: dict[str, torch.Tensor]) -> RecurrentActorCritic:
    action = block["action"]
    space = (gym.spaces.Discrete(action["n"]) if action["kind"] == "discrete"
             else gym.spaces.Box(-np.inf, np.inf, (action["dim"],), np.float32))
    policy = RecurrentActorCritic(gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32), space, hidden_size=HIDDEN,
                                  num_layers=block["num_layers"], cell=block["kind"], shared_core=block["shared_core"],
                                  condition_on_last_action=reference.conditions_on_last_action(block))
    policy.load_state_dict(params, strict=True)
    return policy


@pytest.mark.parametrize("last_action", [False, True], ids=["obs", "obs+last_action"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("action", [{"kind": "discrete", "n": 3}, {"kind": "continuous", "dim": 2}], ids=["discrete", "box"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reference_forward_and_gradients_equal_recurrent_actor_critic(cell, shared, action, layers, last_action):
    block = _policy_block(cell, shared, layers, action, last_action)
    gen = torch.Generator().manual_seed(7)
    params = {name: 0.5 * torch.randn(shape, generator=gen)
              for name, shape in parameter_shapes(block).items()}
    rows = _inputs(block, gen)
    policy = _core(block, params)
    assert set(policy.state_keys) == set(reference.state_keys(block))

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    logprob, entropy, values = reference.recurrent_policy_forward(leaves, block, rows)
    fields = policy.get_agent_experience_spec().fields
    out = policy(TensorDict({k: rows[k] for k in fields}, batch_size=[ROWS, HORIZON]), action=rows["actions"])
    for name, want, got in (("logprob", logprob, out["act_log_prob"]), ("entropy", entropy, out["entropy"]),
                            ("values", values, out["values"])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)

    weights = torch.randn(3, ROWS, HORIZON, generator=gen)
    (weights[0] * logprob + weights[1] * entropy + weights[2] * values).sum().backward()
    (weights[0] * out["act_log_prob"] + weights[1] * out["entropy"] + weights[2] * out["values"]).sum().backward()
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-5, atol=1e-5, msg=name)


def test_parameter_shapes_are_recurrent_actor_critics():
    for cell, shared, action, last_action in (("lstm", False, {"kind": "continuous", "dim": 2}, False),
                                              ("gru", True, {"kind": "continuous", "dim": 2}, False),
                                              ("lstm", False, {"kind": "discrete", "n": 4}, True),
                                              ("gru", True, {"kind": "continuous", "dim": 2}, True)):
        block = _policy_block(cell, shared, 2, action, last_action)
        policy = _core(block, {k: torch.zeros(s) for k, s in parameter_shapes(block).items()})
        assert {k: tuple(v.shape) for k, v in policy.state_dict().items()} == parameter_shapes(block)


@pytest.mark.parametrize("name", ["lstm_discrete_dones_truncations", "lstm_continuous", "gru_shared_backbone",
                                  "lstm_last_action"])
def test_recurrent_cases_need_the_unroll_from_column_0(name):
    """A runner that reads each column's stored state (instead of unrolling from column 0), or that
    skips the reset of the stored state at column 0, gets other numbers than the case expects."""
    case = load_case(CASES_DIR / f"{name}.json")
    block = case.config["policy"]
    params = {k: torch.from_numpy(v).double() for k, v in case.weights.items()}
    rows = {k: torch.from_numpy(v) for k, v in case.data.items()}
    rows = {k: v.double() if v.is_floating_point() else v for k, v in rows.items()}
    with torch.no_grad():
        unrolled = reference.recurrent_policy_forward(params, block, rows)[2]
        per_column = torch.stack([
            reference.recurrent_policy_forward(params, block, {k: v[:, t:t + 1] for k, v in rows.items()})[2][:, 0]
            for t in range(rows["values"].shape[1])], dim=1)
        no_reset_at_0 = reference.recurrent_policy_forward(
            params, block, {**rows, "dones": rows["dones"] * 0, "truncateds": rows["truncateds"] * 0})[2]
    reset = (rows["dones"] + rows["truncateds"]) > 0
    later = ~reset
    later[:, 0] = False
    assert (unrolled - per_column)[later].abs().min() > 1e-6  # every later column without a reset differs
    reset_0 = reset[:, 0]
    if reset_0.any():
        assert (unrolled[reset_0, 0] - no_reset_at_0[reset_0, 0]).abs().min() > 1e-4
    # the stored states are not zero anywhere, so the column-0 start matters
    assert all(np.abs(case.data[k]).min() > 0 for k in case.state_keys)
