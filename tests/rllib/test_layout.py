"""Episodes -> Metta layout (SPEC §1): index shift, right alignment, first-pass advantages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from bridges.rllib import MettaLayoutConnector, check_metta_batch
from metta_core.errors import MettaError
from tests.rllib.conftest import HORIZON, episode, make_config


def gae_with_row_cuts(values, rewards, terminated, columns, gamma, lam, horizon):
    """GAE(lambda) in RLlib's convention (``rewards[t]`` follows ``a_t``; ``values`` has ``L+1``
    entries, the last ``V(o_L)``), except that a step sitting in a row's last column (``columns[t]
    == horizon - 1``) has advantage 0 and cuts the recursion (SPEC §1-2). float64 loop."""
    length = len(rewards)
    adv = np.zeros(length)
    last = 0.0
    for t in reversed(range(length)):
        if columns[t] == horizon - 1:
            last = 0.0
        else:
            nonterminal = 0.0 if (terminated and t == length - 1) else 1.0
            delta = rewards[t] + gamma * values[t + 1] * nonterminal - values[t]
            last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv


def run_connector(learner, config, episodes):
    out = MettaLayoutConnector.from_config(config)(rl_module=learner.module, batch={}, episodes=episodes)
    return out[DEFAULT_MODULE_ID]


def locate(batch, ep) -> int:
    """Slot index of the episode's first observation (observations are unique random vectors)."""
    first = torch.as_tensor(ep.get_observations()[0])
    (hits,) = torch.nonzero((batch[Columns.OBS] == first).all(dim=1), as_tuple=True)
    assert len(hits) == 1
    return int(hits[0])


EPISODES = [(5, True), (HORIZON - 1, False), (1, False), (2 * HORIZON + 3, True), (HORIZON + 2, False), (3, True)]


def test_chunks_in_metta_layout_with_gae_advantages(learner):
    config = make_config()
    eps = [episode(length, terminated, seed) for seed, (length, terminated) in enumerate(EPISODES)]
    batch = run_connector(learner, config, eps)
    segments = check_metta_batch(batch, HORIZON, where="test")
    assert int(batch[Columns.LOSS_MASK].sum()) == sum(len(e) for e in eps)
    padding = segments * HORIZON - sum(len(e) + 1 for e in eps)
    assert 0 <= padding < len(eps) * HORIZON
    ppo = learner._metta_ppo
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    for ep in eps:
        length = len(ep)
        start = locate(batch, ep)
        sl = slice(start, start + length + 1)
        # metta.rewards[t+1] == rllib.rewards[t]; metta.dones[L] == terminated; slot L has no action
        np.testing.assert_array_equal(batch[Columns.REWARDS][sl][1:].numpy(), ep.get_rewards())
        assert batch[Columns.TERMINATEDS][sl].tolist() == [0.0] * length + [float(ep.is_terminated)]
        assert batch[Columns.LOSS_MASK][sl].tolist() == [True] * length + [False]
        np.testing.assert_array_equal(batch[Columns.ACTIONS][sl][:-1].numpy(), ep.get_actions())
        if not ep.is_terminated:  # the bootstrap slot closes a row
            assert (start + length) % HORIZON == HORIZON - 1
        obs = torch.as_tensor(ep.get_observations())
        with torch.no_grad():
            values = module.compute_values({Columns.OBS: obs})
        torch.testing.assert_close(batch[Columns.VF_PREDS][sl], values)
        expected = gae_with_row_cuts(
            values.double().numpy(), ep.get_rewards().astype(np.float64), ep.is_terminated,
            [(start + t) % HORIZON for t in range(length)], ppo.gamma, ppo.gae_lambda, HORIZON,
        )
        np.testing.assert_allclose(batch[Columns.ADVANTAGES][sl][:-1].numpy(), expected, atol=1e-5)
    adv = batch[Columns.ADVANTAGES]
    assert adv[~batch[Columns.LOSS_MASK]].abs().sum() == 0
    assert torch.all(adv.reshape(segments, HORIZON)[:, -1] == 0)


def test_terminated_chunks_share_rows(learner):
    """Short terminated episodes run on in the same row, as in Metta's agent stream."""
    eps = [episode(2, True, 10 + i) for i in range(4)]  # 4 x 3 slots = 12 slots
    batch = run_connector(learner, make_config(), eps)
    assert check_metta_batch(batch, HORIZON, where="test") == 2
    assert [locate(batch, e) for e in eps] == [0, 3, 6, 9]


def test_empty_episode_list_gives_empty_batch(learner):
    batch = run_connector(learner, make_config(), [])
    assert check_metta_batch(batch, HORIZON, where="test") == 0


def test_update_from_episodes_trains_on_a_small_shard(learner):
    """Fewer rows than a minibatch (a small shard): padded with masked rows, still one full phase."""
    before = [p.detach().clone() for p in learner.module[DEFAULT_MODULE_ID].parameters()]
    results = learner.update(episodes=[episode(6, True, 4), episode(9, False, 5)])
    assert set(results[DEFAULT_MODULE_ID]) >= {
        "policy_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "importance", "current_logprobs",
        "explained_variance",
    }
    assert all(np.isfinite(results[DEFAULT_MODULE_ID][k].peek()) for k in ("policy_loss", "vf_loss", "entropy"))
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.module[DEFAULT_MODULE_ID].parameters()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_episode_reward_names_the_column(learner, bad):
    ep = episode(4, False, 6, bad_reward_at=(2, bad))
    with pytest.raises(MettaError, match=r"'rewards'.*non-finite.*\[2\]"):
        run_connector(learner, make_config(), [ep])


def with_rollout_values(ep, values):
    """``ep`` with ``Columns.VF_PREDS`` per step, as RLlib's env runner stores a sampling forward's values."""
    return SingleAgentEpisode(
        observations=list(ep.get_observations()), actions=list(ep.get_actions()), rewards=list(ep.get_rewards()),
        extra_model_outputs={Columns.ACTION_LOGP: list(ep.get_extra_model_outputs(Columns.ACTION_LOGP)),
                             Columns.VF_PREDS: list(np.asarray(values, np.float32))},
        terminated=ep.is_terminated, len_lookback_buffer=0,
    ).to_numpy()


def spy_value_pass(module, monkeypatch) -> list[int]:
    """Record the number of slots of each ``compute_values`` call of ``module``."""
    calls, inner = [], module.compute_values
    monkeypatch.setattr(module, "compute_values", lambda batch, embeddings=None: calls.append(len(batch[Columns.OBS]))
                        or inner(batch, embeddings))
    return calls


def test_rollout_values_are_used_and_the_other_slots_get_a_value_pass(learner, monkeypatch):
    """Episodes with ``VF_PREDS`` (a sampling forward that returns values): those values on the step
    slots, byte for byte; one value pass over the other slots only (``o_L``, padding), whose values
    (the bootstrap ``V(o_L)`` of a truncated chunk among them) are those of the full value pass."""
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    plain = [episode(length, terminated, seed) for seed, (length, terminated) in enumerate(EPISODES)]
    rng = np.random.default_rng(0)
    rolled = [with_rollout_values(ep, rng.normal(size=len(ep))) for ep in plain]  # not the module's values
    calls = spy_value_pass(module, monkeypatch)
    got = run_connector(learner, make_config(), rolled)
    steps = int(got[Columns.LOSS_MASK].sum())
    assert calls == [len(got[Columns.OBS]) - steps]
    calls.clear()
    full = run_connector(learner, make_config(), plain)
    assert calls == [len(full[Columns.OBS])]
    for ep_rolled, ep in zip(rolled, plain):
        start = locate(got, ep_rolled)
        assert start == locate(full, ep)
        length = len(ep)
        assert torch.equal(got[Columns.VF_PREDS][start : start + length],
                           torch.as_tensor(ep_rolled.get_extra_model_outputs(Columns.VF_PREDS)))
        with torch.no_grad():
            bootstrap = module.compute_values({Columns.OBS: torch.as_tensor(ep.get_observations()[-1:])})
        for batch in (got, full):  # V(o_L) in both paths
            torch.testing.assert_close(batch[Columns.VF_PREDS][start + length], bootstrap[0], atol=1e-6, rtol=0)
    other = ~got[Columns.LOSS_MASK]
    torch.testing.assert_close(got[Columns.VF_PREDS][other], full[Columns.VF_PREDS][other], atol=1e-6, rtol=0)
    for column in (Columns.OBS, Columns.ACTIONS, Columns.REWARDS, Columns.TERMINATEDS, Columns.LOSS_MASK):
        assert torch.equal(got[column], full[column]), column


def test_rollout_values_of_the_same_weights_give_the_value_pass_numbers(learner):
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    plain = [episode(length, terminated, seed) for seed, (length, terminated) in enumerate(EPISODES)]
    rolled = []
    for ep in plain:  # values of the same weights, computed per episode (other batch sizes than the value pass)
        with torch.no_grad():
            rolled.append(with_rollout_values(ep, module.compute_values({Columns.OBS: torch.as_tensor(ep.get_observations()[:-1])})))
    got, full = (run_connector(learner, make_config(), eps) for eps in (rolled, plain))
    torch.testing.assert_close(got[Columns.VF_PREDS], full[Columns.VF_PREDS], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[Columns.ADVANTAGES], full[Columns.ADVANTAGES], atol=1e-5, rtol=0)


def test_a_chunk_without_rollout_values_means_a_value_pass_over_all_slots(learner, monkeypatch):
    """Mixed episodes (one without ``VF_PREDS``): exactly the batch of episodes without any."""
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    plain = [episode(length, terminated, seed) for seed, (length, terminated) in enumerate(EPISODES)]
    mixed = [with_rollout_values(ep, np.ones(len(ep))) for ep in plain[:-1]] + plain[-1:]
    calls = spy_value_pass(module, monkeypatch)
    got, full = (run_connector(learner, make_config(), eps) for eps in (mixed, plain))
    assert calls == [len(full[Columns.OBS])] * 2
    assert set(got) == set(full) and all(torch.equal(got[c], full[c]) for c in full)


def test_rollout_values_not_one_per_step_are_refused(learner):
    ep = episode(5, False, 7)
    wide = with_rollout_values(ep, np.zeros((5, 2)))  # e.g. a sampling forward returning [batch, 2] values
    with pytest.raises(MettaError, match=r"'vf_preds' of shape \(5, 2\) for length 5; expected one value per step"):
        run_connector(learner, make_config(), [wide])
