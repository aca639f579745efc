"""Stateful RLModules in the RLlib bridge (SPEC §6): stored states, rows, identity with the core, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from tensordict import TensorDict
from torch.utils._pytree import tree_leaves, tree_map

from bridges.rllib import MettaLayoutConnector, metta_loss_terms, metta_ppo_config, metta_settings
from bridges.rllib.layout import first_pass_advantage
from bridges.rllib.recurrent import STATE_RESETS, MettaRecurrentModule, flat_outputs, row_batch
from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import ppo_minibatch_loss
from metta_core.recurrent_policy import RecurrentActorCritic
from metta_core.run import build_policy

from tests.rllib.conftest import as_multi_agent

HORIZON = 8
HIDDEN = 8
ENV = "CartPole-v1"


def recurrent_config(module: str = "metta", horizon: int = HORIZON, batch_size: int = 128, **model):
    """A CartPole config with a stateful module: ``metta`` (MettaRecurrentModule) or ``use_lstm`` (RLlib's)."""
    config = metta_ppo_config(ENV, batch_size=batch_size, bptt_horizon=horizon, minibatch_size=4 * horizon)
    if module == "metta":
        config = config.rl_module(rl_module_spec=RLModuleSpec(module_class=MettaRecurrentModule),
                                  model_config={"hidden_size": HIDDEN, "max_seq_len": horizon, **model})
    else:
        config = config.rl_module(model_config={"use_lstm": True, "lstm_cell_size": HIDDEN, "fcnet_hiddens": [HIDDEN],
                                                "max_seq_len": horizon, **model})
    return (config.training(lr=1e-3)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=2, rollout_fragment_length=37)
            .debugging(seed=0))


def sampled(config, steps: int = 150, scramble: bool = False):
    """A learner and episode chunks sampled by a local env runner holding the learner's weights.

    ``scramble`` redraws every parameter from N(0, 0.5): with Metta's init (every gate bias 1, policy
    gain 0.01) the log-probs hardly depend on the state, so a test of the stored states needs this."""
    learner = config.build_learner(env=gym.make(ENV))
    if scramble:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in learner.module[DEFAULT_MODULE_ID].parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    runner = SingleAgentEnvRunner(config=config)
    runner.module.set_state(learner.module[DEFAULT_MODULE_ID].get_state())
    runner.sample(num_timesteps=steps)  # a first sample: the next one has chunks continuing episodes
    return learner, runner.sample(num_timesteps=steps)


@pytest.fixture(scope="module", params=["metta", "use_lstm"])
def sample(request):
    return request.param, *sampled(recurrent_config(request.param), scramble=True)


# -- the layout of sampled chunks ---------------------------------------------------------------


def test_every_step_is_trained_once_in_rows_that_start_from_stored_states(sample):
    _, learner, episodes = sample
    batch = MettaLayoutConnector(ppo=PPOConfig(), horizon=HORIZON)(
        rl_module=learner.module, batch={}, episodes=episodes)[DEFAULT_MODULE_ID]
    assert any(e.t_started > 0 for e in episodes) and any(not e.is_terminated for e in episodes)
    mask = batch[Columns.LOSS_MASK].reshape(-1, HORIZON)
    resets = batch[STATE_RESETS].reshape(-1, HORIZON)
    assert int(mask.sum()) == sum(len(e) for e in episodes)
    assert mask.any(dim=1).all()  # no row without a trained step (a minibatch of such rows cannot normalize)
    assert not resets[:, 1:].any() and int(resets[:, 0].sum()) == sum(e.t_started == 0 for e in episodes)
    # the stored input state of a step is the output state of the step before (RLlib's STATE_OUT)
    e = next(e for e in episodes if e.t_started > 0 and len(e) > 1)
    outs = e.get_extra_model_outputs(Columns.STATE_OUT)
    obs = batch[Columns.OBS]
    slot = next(i for i in range(len(obs)) if np.array_equal(obs[i].numpy(), e.get_observations(1)))
    for a, b in zip(tree_leaves(batch[Columns.STATE_IN]), tree_leaves(outs)):
        assert np.array_equal(a[slot].numpy(), b[0])


@pytest.mark.parametrize("terminated", [True, False])
def test_chunk_filling_whole_rows_keeps_its_last_advantage(terminated):
    """``L = 2 * horizon`` steps: the last row covers the chunk's last ``horizon`` slots (not only the
    masked ``o_L``), so the last step's advantage is ``r - V`` (terminated) or ``r + gamma V(o_L) - V``."""
    learner = recurrent_config().build_learner(env=gym.make(ENV))
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    ppo = metta_settings(learner.config)[0]
    chunk = _stateful_episode(module, length=2 * HORIZON, terminated=terminated, seed=5)
    batch = MettaLayoutConnector(ppo=ppo, horizon=HORIZON)(rl_module=learner.module, batch={}, episodes=[chunk])
    batch = batch[DEFAULT_MODULE_ID]
    mask = batch[Columns.LOSS_MASK].reshape(-1, HORIZON)
    assert mask.shape[0] == 3 and int(mask.sum()) == 2 * HORIZON and mask.any(dim=1).all()
    last = int(torch.nonzero(batch[Columns.LOSS_MASK]).max())
    values, reward = batch[Columns.VF_PREDS], float(chunk.get_rewards()[-1])
    bootstrap = 0.0 if terminated else ppo.gamma * float(values[last + 1])
    torch.testing.assert_close(float(batch[Columns.ADVANTAGES][last]), reward + bootstrap - float(values[last]))


def test_rows_reproduce_the_rollout_log_probs(sample):
    """Unrolling each row from its column 0's stored state gives the env runner's own log-probs: the
    states are the ones the rollout used, and the row forward is the rollout's recursion."""
    _, learner, episodes = sample
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    batch = MettaLayoutConnector(ppo=PPOConfig(), horizon=HORIZON)(
        rl_module=learner.module, batch={}, episodes=episodes)[DEFAULT_MODULE_ID]
    rows = row_batch(module, batch, HORIZON, where="test")
    with torch.no_grad():
        out = flat_outputs(module, rows, module.forward_train(rows))
    dist = module.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    mask = batch[Columns.LOSS_MASK]
    logp = dist.logp(batch[Columns.ACTIONS])
    torch.testing.assert_close(logp[mask], batch[Columns.ACTION_LOGP][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[Columns.VF_PREDS], batch[Columns.VF_PREDS])


def test_truncated_chunk_bootstraps_with_zero_advantage_mid_row():
    """A truncated chunk whose last slot is mid-row: A0[L] == 0 and every valid A0 equals a slow GAE
    loop bootstrapped with V(o_L) (RLlib's truncation), whatever padding follows."""
    learner = recurrent_config().build_learner(env=gym.make(ENV))
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    ppo = metta_settings(learner.config)[0]
    chunk = _stateful_episode(module, length=5, terminated=False, seed=3)
    batch = MettaLayoutConnector(ppo=ppo, horizon=HORIZON)(rl_module=learner.module, batch={}, episodes=[chunk])
    batch = batch[DEFAULT_MODULE_ID]
    values, adv = batch[Columns.VF_PREDS], batch[Columns.ADVANTAGES]
    assert len(values) == HORIZON and adv[5] == 0 and batch[Columns.TERMINATEDS][6] == 1
    rewards = np.asarray(chunk.get_rewards())
    expected, gae = np.zeros(5), 0.0
    for t in reversed(range(5)):
        gae = rewards[t] + ppo.gamma * float(values[t + 1]) - float(values[t]) + ppo.gamma * ppo.gae_lambda * gae
        expected[t] = gae
    np.testing.assert_allclose(adv[:5].numpy(), expected, rtol=1e-5, atol=1e-6)


# -- identity with the core -----------------------------------------------------------------------


@pytest.mark.parametrize("cell,continuous", [("lstm", False), ("gru", False), ("lstm", True)])
def test_loss_and_gradients_equal_the_core_on_the_same_rows(cell, continuous):
    """MettaRecurrentModule + the bridge's row forward + Metta's loss == RecurrentActorCritic on the
    same stored-state rows, with resets at column 0, mid-row (dones) and truncations."""
    g = torch.Generator().manual_seed(1)
    obs_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    act_space = gym.spaces.Box(-1, 1, (2,), np.float32) if continuous else gym.spaces.Discrete(3)
    rows, horizon = 4, 6
    core = RecurrentActorCritic(obs_space, act_space, HIDDEN, cell=cell)
    module = MettaRecurrentModule(observation_space=obs_space, action_space=act_space,
                                  model_config={"hidden_size": HIDDEN, "cell": cell})
    module.net.load_state_dict(core.state_dict())
    dones = torch.zeros(rows, horizon)
    truncateds = torch.zeros(rows, horizon)
    dones[0, 0] = dones[1, 3] = dones[2, 1] = 1.0
    truncateds[1, 5] = truncateds[3, 2] = 1.0
    td = TensorDict({"env_obs": torch.randn(rows, horizon, 3, generator=g), "dones": dones, "truncateds": truncateds},
                    [rows, horizon])
    for key in core.state_keys:
        td[key] = torch.randn(rows, horizon, 1, HIDDEN, generator=g)
    actions = (torch.randn(rows, horizon, 2, generator=g) if continuous
               else torch.randint(0, 3, (rows, horizon), generator=g))
    data = {
        "values": torch.randn(rows, horizon, generator=g), "rewards": torch.randn(rows, horizon, generator=g),
        "old_logprob": -1.0 + 0.1 * torch.randn(rows, horizon, generator=g),
    }
    ppo = PPOConfig()
    data["advantages"] = first_pass_advantage(
        {Columns.VF_PREDS: data["values"].reshape(-1), Columns.REWARDS: data["rewards"].reshape(-1),
         Columns.TERMINATEDS: dones.reshape(-1), Columns.LOSS_MASK: torch.ones(rows * horizon, dtype=torch.bool)},
        horizon, ppo).reshape(rows, horizon)

    out = core(td.clone(), action=actions)
    core_terms = ppo_minibatch_loss(ppo, old_logprob=data["old_logprob"], new_logprob=out["act_log_prob"],
                                    entropy=out["entropy"], new_values=out["values"].reshape(rows, horizon),
                                    values=data["values"], rewards=data["rewards"], dones=dones,
                                    advantages=data["advantages"])
    core_terms.loss.backward()

    n = rows * horizon
    batch = {
        Columns.OBS: td["env_obs"].reshape(n, 3), Columns.ACTIONS: actions.reshape(n, *actions.shape[2:]),
        Columns.ACTION_LOGP: data["old_logprob"].reshape(n), Columns.VF_PREDS: data["values"].reshape(n),
        Columns.REWARDS: data["rewards"].reshape(n), Columns.TERMINATEDS: dones.reshape(n),
        Columns.ADVANTAGES: data["advantages"].reshape(n), Columns.LOSS_MASK: torch.ones(n, dtype=torch.bool),
        Columns.STATE_IN: {key: td[key].reshape(n, 1, HIDDEN) for key in core.state_keys},
        STATE_RESETS: (dones + truncateds).bool().reshape(n),
    }
    module_rows = row_batch(module, batch, horizon, where="test")
    fwd = flat_outputs(module, module_rows, module.forward_train(module_rows))
    terms = metta_loss_terms(module, batch, fwd, ppo, horizon)
    terms.loss.backward()

    assert torch.equal(terms.loss, core_terms.loss)
    for name, param in core.named_parameters():
        torch.testing.assert_close(module.net.get_parameter(name).grad, param.grad, rtol=0, atol=0, msg=name)


def test_cli_module_starts_from_the_core_policy_of_the_same_seed():
    obs_space, act_space = gym.spaces.Box(-1, 1, (2,), np.float32), gym.spaces.Discrete(2)
    module = MettaRecurrentModule(observation_space=obs_space, action_space=act_space,
                                  model_config={"hidden_size": 16, "cell": "lstm", "seed": 7})
    torch.manual_seed(7)  # as metta_core.run.CoreRun does before build_policy
    core = build_policy("lstm", obs_space, act_space, 16)
    assert core.state_dict().keys() == module.net.state_dict().keys()
    assert all(torch.equal(v, module.net.state_dict()[k]) for k, v in core.state_dict().items())


# -- bad input ------------------------------------------------------------------------------------


def test_max_seq_len_differing_from_bptt_horizon_is_refused():
    config = recurrent_config("use_lstm").rl_module(model_config={"use_lstm": True, "max_seq_len": 20})
    with pytest.raises(MettaError, match=r"max_seq_len \(20\) differs from Metta's bptt_horizon \(8\).*'max_seq_len': 8"):
        config.build_learner(env=gym.make(ENV))


def _learner_batch(module_kind: str = "metta"):
    learner = recurrent_config(module_kind).build_learner(env=gym.make(ENV))
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    episodes = [_stateful_episode(module, length=6, terminated=True, seed=s) for s in range(4)]
    batch = MettaLayoutConnector(ppo=metta_settings(learner.config)[0], horizon=HORIZON)(
        rl_module=learner.module, batch={}, episodes=episodes)[DEFAULT_MODULE_ID]
    return learner, batch


def test_missing_stored_state_is_refused():
    learner, batch = _learner_batch()
    del batch[Columns.STATE_IN]
    with pytest.raises(MettaError, match=r"is stateful but the batch has no 'state_in' column.*MettaLayoutConnector"):
        learner.update(batch=as_multi_agent(batch))


def test_stored_state_of_another_size_is_refused():
    learner, batch = _learner_batch()
    batch[Columns.STATE_IN] = tree_map(lambda s: torch.zeros(s.shape[0], 1, 2 * HIDDEN), batch[Columns.STATE_IN])
    with pytest.raises(MettaError, match=r"'state_in' leaf 0 has shape \(\d+, 1, 16\), expected \(\d+, 1, 8\)"):
        learner.update(batch=as_multi_agent(batch))


def test_reset_after_column_0_is_refused_for_rllibs_lstm():
    learner, batch = _learner_batch("use_lstm")
    batch[STATE_RESETS][3] = True
    with pytest.raises(MettaError, match=r"resets the state after column 0 of a row.*MettaRecurrentModule"):
        learner.update(batch=as_multi_agent(batch))


# -- training -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("module_kind", ["metta", "use_lstm"])
def test_learner_trains_on_sampled_chunks(module_kind):
    """Three phases on sampled chunks: finite stats, the parameters move, the log-probs of the
    first phase's first minibatch match the rollout's (ratio 1 before any step)."""
    config = recurrent_config(module_kind)
    learner, episodes = sampled(config, steps=128)
    before = [p.detach().clone() for p in learner.module[DEFAULT_MODULE_ID].parameters()]
    for _ in range(3):
        results = learner.update(episodes=episodes)[DEFAULT_MODULE_ID]
        assert all(np.isfinite(float(results[k].peek())) for k in ("policy_loss", "vf_loss", "entropy"))
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.module[DEFAULT_MODULE_ID].parameters()))


# -- helpers --------------------------------------------------------------------------------------


def _stateful_episode(module, length: int, terminated: bool, seed: int) -> SingleAgentEpisode:
    """A numpy'd CartPole chunk from an episode start, with random ``STATE_OUT`` of ``module``'s shapes."""
    rng = np.random.default_rng(seed)
    initial = module.get_initial_state()
    outs = [tree_map(lambda s: rng.normal(size=tuple(s.shape)).astype(np.float32), initial) for _ in range(length)]
    return SingleAgentEpisode(
        observations=[rng.normal(size=4).astype(np.float32) for _ in range(length + 1)],
        actions=list(rng.integers(0, 2, length)),
        rewards=list(rng.normal(size=length).astype(np.float32)),
        extra_model_outputs={Columns.ACTION_LOGP: list(rng.normal(-0.7, 0.1, length).astype(np.float32)),
                             Columns.STATE_OUT: outs},
        terminated=terminated,
        len_lookback_buffer=0,
    ).to_numpy()


@pytest.mark.slow
def test_lstm_run_with_a_remote_env_runner_saves_and_resumes(tmp_path):
    """``--policy lstm`` on CartPoleNoVel-v1 with one remote env runner (it must build the env from its
    ``module:id``), two iterations, a checkpoint, and a resume that restores the module's weights."""
    import ray

    from bridges.rllib.cluster import init_private_ray
    from bridges.rllib.settings import RLlibSettings
    from bridges.rllib.train import RLlibRun, build_config
    from metta_core.run import TrainArgs

    args = TrainArgs(framework="rllib", policy="lstm", env="CartPoleNoVel-v1", batch_size=256, bptt_horizon=16,
                     minibatch_size=128, update_epochs=2, hidden_size=16, num_envs=4, progress=False,
                     target_return=None, trust_checkpoint=True)
    settings = RLlibSettings(num_env_runners=1)
    init_private_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run = RLlibRun(build_config(args, settings), args)
        try:
            rows = [run.iteration() for _ in range(2)]
            assert all(np.isfinite(r["policy_loss"]) and r["env_steps"] > 0 for r in rows)
            weights = {k: v.clone() for k, v in run.algo.get_module().state_dict().items()}
            run.save(tmp_path / "ckpt")
        finally:
            run.close()
        resumed = RLlibRun(build_config(args, settings), args, resume=tmp_path / "ckpt")
        try:
            restored = resumed.algo.get_module().state_dict()
            assert all(torch.equal(weights[k], restored[k]) for k in weights)
            assert np.isfinite(resumed.iteration()["policy_loss"])
        finally:
            resumed.close()
    finally:
        ray.shutdown()


def test_custom_stateful_module_carries_the_loss_through_metta_self_supervised_loss():
    """``class M(MettaSelfSupervisedLoss, MettaRecurrentModule)``: RLlib's SelfSupervisedLossAPI path
    in MettaPPOLearner gives the same update as the learner's own loss on the plain module."""
    from bridges.rllib import MettaSelfSupervisedLoss

    class SelfSupervised(MettaSelfSupervisedLoss, MettaRecurrentModule):
        pass

    config = recurrent_config()
    learner, episodes = sampled(config, steps=96)
    custom = config.rl_module(rl_module_spec=RLModuleSpec(module_class=SelfSupervised)).build_learner(env=gym.make(ENV))
    custom.module[DEFAULT_MODULE_ID].set_state(learner.module[DEFAULT_MODULE_ID].get_state())
    results = [l.update(episodes=episodes)[DEFAULT_MODULE_ID] for l in (learner, custom)]
    assert float(results[0]["policy_loss"].peek()) == float(results[1]["policy_loss"].peek())
    for a, b in zip(learner.module[DEFAULT_MODULE_ID].parameters(), custom.module[DEFAULT_MODULE_ID].parameters()):
        assert torch.equal(a, b)


def test_flat_slots_into_the_recurrent_module_name_the_fix():
    """What a stock Learner would do with a Metta-layout batch: a clear error, not a shape error deep inside."""
    module = MettaRecurrentModule(observation_space=gym.spaces.Box(-1, 1, (4,), np.float32),
                                  action_space=gym.spaces.Discrete(2), model_config={"hidden_size": HIDDEN})
    flat = {Columns.OBS: torch.zeros(16, 4), Columns.STATE_IN: tree_map(lambda s: s.expand(16, *s.shape),
                                                                        module.get_initial_state())}
    with pytest.raises(MettaError, match=r"'obs' has shape \(16, 4\), expected \[rows, T, 4\].*MettaPPOLearner"):
        module.forward_train(flat)


@pytest.mark.parametrize("module_kind", ["metta", "use_lstm"])
def test_zero_state_at_rollout_start_is_metta_rollout_rule_on_both_sides(module_kind):
    """``zero_state_at_rollout_start``: the env runner runs the first step of a continuing chunk from
    zeros (Metta's reset_memory at a rollout's start) and the layout stores zeros there, so the rows
    reproduce the rollout's log-probs; reading the lookback state instead (RLlib's carry) does not."""
    from bridges.rllib.recurrent import zero_state_at_rollout_start

    config = zero_state_at_rollout_start(recurrent_config(module_kind))
    learner, episodes = sampled(config, scramble=True)
    assert any(e.t_started > 0 for e in episodes)
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()

    def max_logp_error(zero: bool) -> float:
        batch = MettaLayoutConnector(ppo=PPOConfig(), horizon=HORIZON, zero_state_at_rollout_start=zero)(
            rl_module=learner.module, batch={}, episodes=episodes)[DEFAULT_MODULE_ID]
        rows = row_batch(module, batch, HORIZON, where="test")
        with torch.no_grad():
            out = flat_outputs(module, rows, module.forward_train(rows))
        logp = module.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS]).logp(
            batch[Columns.ACTIONS])
        mask = batch[Columns.LOSS_MASK]
        return float((logp[mask] - batch[Columns.ACTION_LOGP][mask]).abs().max())

    assert MettaLayoutConnector.from_config(config).zero_state_at_rollout_start
    assert max_logp_error(zero=True) < 1e-5
    assert max_logp_error(zero=False) > 1e-3
