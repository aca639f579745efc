"""RecurrentActorCritic on the Policy contract (SPEC §6): what the rollout stores is what training
unrolls, per-agent memory with resets, the experience spec, errors."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from metta_core.errors import MettaError
from metta_core.recurrent_policy import RecurrentActorCritic

OBS = gym.spaces.Box(-1, 1, (3,), np.float32)
SPACES = {"discrete": gym.spaces.Discrete(4), "box": gym.spaces.Box(-1, 1, (2,), np.float32)}


def rollout(policy, steps, agents, gen, reset_prob=0.2, last_actions=False):
    """Step ``policy`` like the core loop does; returns the per-step tensordicts stacked to [agents, steps]."""
    tds = []
    prev = None
    for t in range(steps):
        flags = (torch.rand(2, agents, generator=gen) < reset_prob).float() if t else torch.zeros(2, agents)
        td = TensorDict({"env_obs": torch.randn(agents, 3, generator=gen), "dones": flags[0], "truncateds": flags[1],
                         "training_env_ids": torch.arange(agents)}, batch_size=[agents])
        if last_actions:
            td["last_actions"] = prev if prev is not None else _zero_actions(policy, agents)
        with torch.no_grad():
            policy(td)
        prev = td["actions"].clone()
        tds.append(td)
    return torch.stack(tds, dim=1)


def _zero_actions(policy, agents):
    return torch.zeros(agents, *policy.action_shape, dtype=torch.float32 if policy.continuous else torch.long)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("space", sorted(SPACES))
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_training_rows_reproduce_the_rollout(cell, space, fused, shared):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    policy = RecurrentActorCritic(OBS, SPACES[space], hidden_size=8, num_layers=2, cell=cell, shared_core=shared,
                                  fused_unroll=fused)
    rows = rollout(policy, steps=12, agents=3, gen=gen)
    # rows of 6 columns: the second row of each agent starts from a non-zero stored state
    rows = rows.reshape(3, 2, 6).reshape(6, 6)
    for key in policy.state_keys:
        assert rows[1::2][key][:, 0].abs().sum() > 0
    train_td = rows.select(*policy.get_agent_experience_spec().fields).clone()
    out = policy(train_td, action=rows["actions"])
    torch.testing.assert_close(out["act_log_prob"], rows["act_log_prob"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["values"], rows["values"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["entropy"], rows["entropy"], rtol=1e-5, atol=1e-5)
    assert out["values"].requires_grad


def test_rollout_keeps_state_per_agent_zeroes_it_on_reset_and_stores_the_input_state():
    torch.manual_seed(0)
    policy = RecurrentActorCritic(OBS, SPACES["discrete"], hidden_size=5, shared_core=True)
    trunk = policy.trunks[0]
    obs = torch.randn(2, 3)

    def step(env_ids, dones=(0.0, 0.0)):
        td = TensorDict({"env_obs": obs[: len(env_ids)], "dones": torch.tensor(dones[: len(env_ids)]),
                         "truncateds": torch.zeros(len(env_ids)), "training_env_ids": torch.tensor(env_ids)},
                        batch_size=[len(env_ids)])
        with torch.no_grad():
            return policy(td)

    first = step([0, 1])
    assert first["lstm_h"].shape == (2, 1, 5) and first["lstm_h"].abs().sum() == 0
    second = step([0, 1])
    assert second["lstm_h"].abs().sum() > 0 and not second["lstm_h"].requires_grad
    h_agent1 = trunk.memory[0][:, 1].clone()
    third = step([1], dones=(1.0,))  # agent 1 alone, its episode restarted: input state zeroed
    assert third["lstm_h"].abs().sum() == 0 and third["lstm_c"].abs().sum() == 0
    assert not torch.equal(trunk.memory[0][:, 1], h_agent1)
    fourth = step([0])  # agent 0's state is what its second step left, untouched by agent 1's steps
    with torch.no_grad():
        state = tuple(second[k][:1].transpose(0, 1).contiguous() for k in trunk.state_keys)
        _, (h, _) = trunk.core(trunk.encoder(obs[:1]).unsqueeze(0), state)
    torch.testing.assert_close(fourth["lstm_h"][0], h[:, 0])
    policy.reset_memory()
    assert step([0, 1])["lstm_h"].abs().sum() == 0


def test_experience_spec_declares_state_flags_and_last_actions():
    policy = RecurrentActorCritic(OBS, SPACES["box"], hidden_size=6, num_layers=2, condition_on_last_action=True)
    fields = policy.get_agent_experience_spec().fields
    assert set(fields) == {"env_obs", "dones", "truncateds", "last_actions", "actor_lstm_h", "actor_lstm_c",
                           "critic_lstm_h", "critic_lstm_c"}
    assert all(fields[k].shape == (2, 6) for k in policy.state_keys)
    assert fields["last_actions"].shape == (2,) and fields["last_actions"].dtype == torch.float32
    gru = RecurrentActorCritic(OBS, SPACES["discrete"], hidden_size=6, cell="gru", shared_core=True)
    assert set(gru.get_agent_experience_spec().fields) == {"env_obs", "dones", "truncateds", "gru_h"}


def test_last_action_conditioning_changes_the_output():
    torch.manual_seed(0)
    policy = RecurrentActorCritic(OBS, SPACES["discrete"], hidden_size=6, condition_on_last_action=True)
    td = TensorDict({"env_obs": torch.zeros(2, 3), "last_actions": torch.tensor([0, 3])}, batch_size=[2])
    with torch.no_grad():
        out = policy(td)
    assert not torch.equal(out["values"][0], out["values"][1])
    with pytest.raises(MettaError, match="has no 'last_actions'.*add_last_action_to_td"):
        policy(TensorDict({"env_obs": torch.zeros(2, 3)}, batch_size=[2]))


def test_metta_init_of_the_recurrent_core():
    policy = RecurrentActorCritic(OBS, SPACES["discrete"], hidden_size=4)
    for trunk in policy.trunks:
        assert all((p == 1).all() for n, p in trunk.core.named_parameters() if "bias" in n)


def training_rows(policy, rows=2, horizon=3):
    spec = policy.get_agent_experience_spec()
    return spec.zeros((rows, horizon))


def test_missing_stored_state_names_the_key_and_the_fix():
    policy = RecurrentActorCritic(OBS, SPACES["discrete"], hidden_size=4)
    td = training_rows(policy).exclude("critic_lstm_c")
    with pytest.raises(MettaError, match="no 'critic_lstm_c'.*get_agent_experience_spec"):
        policy(td, action=torch.zeros(2, 3, dtype=torch.long))
    td = training_rows(policy).exclude("dones")
    with pytest.raises(MettaError, match=r"no \['dones'\]"):
        policy(td, action=torch.zeros(2, 3, dtype=torch.long))


def test_stored_state_of_another_size_is_an_error():
    small = RecurrentActorCritic(OBS, SPACES["discrete"], hidden_size=4)
    big = RecurrentActorCritic(OBS, SPACES["discrete"], hidden_size=8, num_layers=2)
    with pytest.raises(MettaError, match=r"'actor_lstm_h' has shape \(2, 3, 1, 4\), expected .* \(2, 3, 2, 8\).*num_layers=2, hidden_size=8"):
        big(training_rows(small), action=torch.zeros(2, 3, dtype=torch.long))


def test_other_batch_shapes_and_cells_are_errors():
    policy = RecurrentActorCritic(OBS, SPACES["discrete"], hidden_size=4)
    with pytest.raises(MettaError, match=r"\[agents\] \(a rollout step\) or \[rows, horizon\].*got \[1, 2, 3\]"):
        policy(TensorDict({"env_obs": torch.zeros(1, 2, 3, 3)}, batch_size=[1, 2, 3]))
    with pytest.raises(MettaError, match="cell must be one of"):
        RecurrentActorCritic(OBS, SPACES["discrete"], cell="rnn")
