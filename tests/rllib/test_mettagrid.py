"""MettaGrid in the RLlib bridge: the MultiAgentEnv against the core adapter, per-agent episodes laid
out in the core's rows (bit-identical training phase), one shared and several modules, GridCNN's
init, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

pytest.importorskip("mettagrid", reason="needs the mettagrid extra: pip install 'metta-bridges[mettagrid]'")

from ray.rllib.core.columns import Columns  # noqa: E402
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec  # noqa: E402
from ray.rllib.core.rl_module.rl_module import RLModuleSpec  # noqa: E402
from ray.rllib.env.multi_agent_episode import MultiAgentEpisode  # noqa: E402
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch  # noqa: E402

from bridges.rllib import MettaLayoutConnector, metta_ppo_config  # noqa: E402
from bridges.rllib.grid_module import GridCNNModule  # noqa: E402
from bridges.rllib.layout import STEP_KEY, STREAM_KEY, pack_streams  # noqa: E402
from bridges.rllib.mettagrid_env import MettaGridMultiAgentEnv  # noqa: E402
from bridges.rllib.train import SHARED_MODULE_ID, shared_module  # noqa: E402
from metta_core.cnn_policy import GridCNN  # noqa: E402
from metta_core.envs.mettagrid import ArenaPreset, MettaGridEnvironment, arena_config  # noqa: E402
from metta_core.errors import MettaError  # noqa: E402
from metta_core.experience import Experience, ExperienceSpec, FieldSpec  # noqa: E402

AGENTS = 4
ENVS = 2
HORIZON = 8
STEPS = 48
"""Steps per agent: 6 rows of HORIZON; episodes end at steps 20 and 40, fragments every 12 steps."""
FRAGMENT = 12
SHORT = ArenaPreset(num_agents=AGENTS, size=9, altars=6, walls=2, max_steps=20)
BATCH = ENVS * AGENTS * STEPS


def first_episode_seed(seed: int) -> int:
    """The seed ``MettaGridMultiAgentEnv(env_config={"seed": seed})`` gives its core adapter."""
    return int(np.random.default_rng(seed).integers(2**31 - 1))


def core_rows(seeds, actions, logps):
    """The core's buffer: per env a ``MettaGridEnvironment`` (one simulation), all agents' steps stored
    through ``metta_core.experience.Experience`` (rows ``block * agents + env * AGENTS + agent``)."""
    envs = [MettaGridEnvironment(arena_config(SHORT), 1, first_episode_seed(s)) for s in seeds]
    obs_shape = envs[0].single_observation_space.shape
    spec = ExperienceSpec({
        "obs": FieldSpec(obs_shape, torch.uint8), "actions": FieldSpec((), torch.int64),
        "logp": FieldSpec(), "rewards": FieldSpec(), "dones": FieldSpec(),
    })
    rows = ENVS * AGENTS
    experience = Experience(rows, BATCH, HORIZON, BATCH, BATCH, spec)
    for t in range(STEPS):
        seen = [env.get_observations() for env in envs]
        step = {
            "obs": torch.as_tensor(np.concatenate([s[0] for s in seen])),
            "rewards": torch.as_tensor(np.concatenate([s[1] for s in seen])),
            "dones": torch.as_tensor(np.concatenate([s[2] for s in seen])),
            "actions": torch.as_tensor(actions[t]), "logp": torch.as_tensor(logps[t]),
        }
        experience.store(step, slice(0, rows))
        for e, env in enumerate(envs):
            env.send_actions(actions[t, e * AGENTS : (e + 1) * AGENTS])
    assert experience.ready_for_training
    buffer = experience.buffer
    return {
        Columns.OBS: buffer["obs"].reshape(BATCH, *obs_shape), Columns.ACTIONS: buffer["actions"].reshape(BATCH),
        Columns.ACTION_LOGP: buffer["logp"].reshape(BATCH), Columns.REWARDS: buffer["rewards"].reshape(BATCH),
        Columns.TERMINATEDS: buffer["dones"].reshape(BATCH), Columns.LOSS_MASK: torch.ones(BATCH, dtype=torch.bool),
    }


def rllib_episodes(seeds, actions, logps, mapping=shared_module):
    """What RLlib's MultiAgentEnvRunner makes of the same steps: one ``MettaGridMultiAgentEnv`` per
    sub-env, a ``MultiAgentEpisode`` per episode, chunks cut every ``FRAGMENT`` steps."""
    envs = [MettaGridMultiAgentEnv({"config": arena_config(SHORT), "seed": s}) for s in seeds]
    done = []

    def new_episode(env):
        episode = MultiAgentEpisode(agent_to_module_mapping_fn=mapping)
        observations, infos = env.reset()
        episode.add_env_reset(observations=observations, infos=infos)
        return episode

    ongoing = [new_episode(env) for env in envs]
    for t in range(STEPS):
        for e, env in enumerate(envs):
            agent_actions = {a: int(actions[t, e * AGENTS + i]) for i, a in enumerate(env.possible_agents)}
            outputs = {a: {Columns.ACTION_LOGP: np.float32(logps[t, e * AGENTS + i])}
                       for i, a in enumerate(env.possible_agents)}
            obs, rewards, terminateds, truncateds, infos = env.step(agent_actions)
            ongoing[e].add_env_step(obs, agent_actions, rewards, infos, terminateds=terminateds,
                                    truncateds=truncateds, extra_model_outputs=outputs)
            if ongoing[e].is_done:
                done.append(ongoing[e].to_numpy())
                ongoing[e] = new_episode(env)
        if (t + 1) % FRAGMENT == 0:  # the runner's end of sample(): cut, return the chunks with steps
            continuations = [episode.cut() for episode in ongoing]
            done += [episode.to_numpy() for episode in ongoing if len(episode)]
            ongoing = continuations
    return done


def module_config(modules=(SHARED_MODULE_ID,), mapping=shared_module, **metta):
    fields = dict(batch_size=BATCH, bptt_horizon=HORIZON, minibatch_size=BATCH // 4, update_epochs=2)
    fields.update(metta)
    specs = {m: RLModuleSpec(module_class=GridCNNModule, model_config={"seed": 3}) for m in modules}
    return (
        metta_ppo_config(None, **fields)
        .multi_agent(policies=set(modules), policy_mapping_fn=mapping, count_steps_by="agent_steps")
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=specs))
        .training(lr=1e-3)
        .debugging(seed=0)
    )


def build_learner(config, modules=(SHARED_MODULE_ID,)):
    env = MettaGridMultiAgentEnv({"config": arena_config(SHORT)})
    spaces = {m: (env.observation_spaces["agent_0"], env.action_spaces["agent_0"]) for m in modules}
    return config.build_learner(spaces=spaces)


@pytest.fixture(scope="module")
def steps():
    rng = np.random.default_rng(11)
    actions = rng.integers(0, 5, (STEPS, ENVS * AGENTS))
    logps = rng.normal(-1.6, 0.1, (STEPS, ENVS * AGENTS)).astype(np.float32)
    return (5, 6), actions, logps


def test_env_steps_like_the_core_adapter_across_episode_ends():
    env = MettaGridMultiAgentEnv({"config": arena_config(SHORT), "seed": 4})
    core = MettaGridEnvironment(arena_config(SHORT), 1, first_episode_seed(4))
    obs, infos = env.reset()
    assert env.possible_agents == [f"agent_{a}" for a in range(AGENTS)]
    rng = np.random.default_rng(0)
    ends = 0
    for t in range(45):
        expected = core.get_observations()[0]
        for i, a in enumerate(env.possible_agents):
            np.testing.assert_array_equal(obs[a], expected[i])
            assert infos[a][STEP_KEY] == t and infos[a][STREAM_KEY] == env._stream
        actions = rng.integers(0, 5, AGENTS)
        obs, rewards, terminateds, truncateds, infos = env.step({a: actions[i] for i, a in enumerate(env.possible_agents)})
        core.send_actions(actions)
        _, core_rewards, core_dones, _, _ = core.get_observations()
        assert [rewards[a] for a in env.possible_agents] == core_rewards.tolist()
        assert terminateds["__all__"] == ((t + 1) % SHORT.max_steps == 0) == bool(core_dones.all())
        assert not truncateds["__all__"]
        if terminateds["__all__"]:
            ends += 1
            reset_obs, infos = env.reset()  # the next episode's first observation, returned with the last step
            for a in env.possible_agents:
                np.testing.assert_array_equal(reset_obs[a], obs[a])
            obs = reset_obs
    assert ends == 2


def test_per_agent_episodes_are_the_core_rows(steps):
    seeds, actions, logps = steps
    expected = core_rows(seeds, actions, logps)
    episodes = rllib_episodes(seeds, actions, logps)
    assert len({(ep.id_, ep.env_t_started) for ep in episodes}) > 2 * ENVS  # episode ends and fragment cuts
    learner = build_learner(module_config())
    batch = MettaLayoutConnector.from_config(learner.config)(rl_module=learner.module, batch={}, episodes=episodes)
    got = batch[SHARED_MODULE_ID]
    for column, value in expected.items():
        assert torch.equal(got[column], value.to(got[column].dtype)), column
    assert got[Columns.TERMINATEDS].sum() == ENVS * AGENTS * 2  # two episode ends inside the stream


def test_training_phase_from_episodes_is_bit_identical_to_the_core_rows(steps):
    """``update(episodes=...)`` (the connector) and ``update(batch=core rows)``: same parameters, same stats."""
    seeds, actions, logps = steps
    learners = [build_learner(module_config()) for _ in range(2)]
    by_episodes = learners[0].update(episodes=rllib_episodes(seeds, actions, logps))
    module = learners[1].module[SHARED_MODULE_ID].unwrapped()
    connector = MettaLayoutConnector.from_config(learners[1].config)
    columns = connector.finish(module, {c: v.numpy() for c, v in core_rows(seeds, actions, logps).items()})
    by_rows = learners[1].update(batch=MultiAgentBatch({SHARED_MODULE_ID: SampleBatch(columns)}, env_steps=BATCH))
    for (name, a), (_, b) in zip(learners[0].module[SHARED_MODULE_ID].named_parameters(), module.named_parameters()):
        assert torch.equal(a, b), name
    for key in ("policy_loss", "vf_loss", "entropy", "approx_kl", "explained_variance"):
        assert by_episodes[SHARED_MODULE_ID][key].peek() == by_rows[SHARED_MODULE_ID][key].peek(), key


def team(agent_id, episode, **kwargs) -> str:
    return "team_a" if int(agent_id.rpartition("_")[2]) < AGENTS // 2 else "team_b"


def test_two_teams_get_their_agents_rows_in_core_order(steps):
    seeds, actions, logps = steps
    expected = core_rows(seeds, actions, logps)
    modules = ("team_a", "team_b")
    learner = build_learner(module_config(modules, team), modules)
    episodes = rllib_episodes(seeds, actions, logps, mapping=team)
    batch = MettaLayoutConnector.from_config(learner.config)(rl_module=learner.module, batch={}, episodes=episodes)
    rows = torch.arange(BATCH // HORIZON).reshape(-1, ENVS, AGENTS)  # core row = block * 8 + env * 4 + agent
    for module_id, agents in (("team_a", slice(0, 2)), ("team_b", slice(2, 4))):
        slots = (rows[:, :, agents].reshape(-1, 1) * HORIZON + torch.arange(HORIZON)).reshape(-1)
        for column, value in expected.items():
            assert torch.equal(batch[module_id][column], value[slots].to(batch[module_id][column].dtype)), (module_id, column)
    stats = learner.update(episodes=episodes)
    assert set(modules) <= set(stats) and all(np.isfinite(stats[m]["policy_loss"].peek()) for m in modules)


def test_a_missing_chunk_leaves_a_bootstrapped_tail(steps):
    """A learner that did not receive a chunk (e.g. sharded episodes): the stream is cut there; each part's
    last ``m < horizon`` steps end in a masked bootstrap slot with the chunk's final observation."""
    seeds, actions, logps = steps
    episodes = rllib_episodes(seeds, actions, logps)
    first = [ep for ep in episodes if ep.env_t_started == 0]
    dropped = first[0]  # steps 0..11 of sub-env 0: its agents' streams now start at step 12 (36 = 4 rows + 4)
    agent_chunks = [sa for ep in episodes if ep is not dropped for sa in ep.agent_episodes.values()]
    columns = pack_streams(agent_chunks, HORIZON)
    mask = columns[Columns.LOSS_MASK].reshape(-1, HORIZON)
    assert mask.sum() == BATCH - AGENTS * FRAGMENT
    tails = mask[~mask.all(axis=1)]
    assert len(tails) == AGENTS and (tails.sum(axis=1) == 4).all() and not tails[:, -1].any()


def test_gridcnn_module_starts_as_the_core_gridcnn_of_the_seed():
    env = MettaGridMultiAgentEnv({"env": "mettagrid:arena-8"})
    obs_space, act_space = env.observation_spaces["agent_0"], env.action_spaces["agent_0"]
    torch.manual_seed(9)
    core = GridCNN(obs_space, act_space, env.feature_scale)
    state = torch.get_rng_state()
    module = GridCNNModule(observation_space=obs_space, action_space=act_space,
                           model_config={"seed": 9, "feature_scale": env.feature_scale.tolist()})
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for (name, a), (_, b) in zip(core.state_dict().items(), module.net.state_dict().items()):
        assert torch.equal(a, b), name
    obs = torch.as_tensor(np.stack([env.reset()[0][a] for a in env.possible_agents]))
    out = module.forward_train({Columns.OBS: obs})
    with torch.no_grad():
        core_values = core(TensorDict({"env_obs": obs}, [len(obs)]))["values"]
        core_logits = core.actor(core.trunk(obs.float() * core.inv_scale))  # GridCNN.forward's logits
        assert torch.equal(module.compute_values({Columns.OBS: obs}), core_values)
    assert torch.equal(out[Columns.ACTION_DIST_INPUTS], core_logits)
    assert out[Columns.ACTION_DIST_INPUTS].shape == (AGENTS * 2, 5)
    assert torch.equal(module.compute_values({Columns.OBS: obs}, out[Columns.EMBEDDINGS]),
                       module.compute_values({Columns.OBS: obs}))


def test_streams_of_different_env_runners_differ():
    """RLlib passes an EnvContext; its worker_index keeps the agents of two env runners apart."""
    from ray.rllib.env.env_context import EnvContext

    streams = [MettaGridMultiAgentEnv(EnvContext({"config": arena_config(SHORT)}, worker_index=w))._stream
               for w in (1, 2, None)]
    assert [s[0] for s in streams] == [1, 2, 0]  # None: an env runner built by hand, as the local one (0)


def test_env_steps_counting_with_several_agents_is_refused(steps):
    seeds, actions, logps = steps
    learner = build_learner(module_config().multi_agent(count_steps_by="env_steps"))  # a learner alone is fine
    connector = MettaLayoutConnector.from_config(learner.config)
    with pytest.raises(MettaError, match=rf"count_steps_by is 'env_steps' and an episode has {AGENTS} agents.*"
                                         r"count_steps_by='agent_steps'"):
        connector(rl_module=learner.module, batch={}, episodes=rllib_episodes(seeds, actions, logps))


@pytest.mark.parametrize("env_config, match", [
    ({}, r"env_config needs 'env' .* or 'config'"),
    ({"env": "mettagrid:arena-9"}, r"'mettagrid:arena-9' is not a MettaGrid preset"),
    ({"env": "mettagrid:arena-8", "num_envs": 2}, r"unknown env_config key\(s\) \['num_envs'\]"),
])
def test_bad_env_config(env_config, match):
    with pytest.raises(MettaError, match=match):
        MettaGridMultiAgentEnv(env_config)


def test_missing_action_is_refused():
    env = MettaGridMultiAgentEnv({"config": arena_config(SHORT)})
    env.reset()
    with pytest.raises(MettaError, match=r"no action for agent\(s\) \['agent_3'\]"):
        env.step({f"agent_{a}": 0 for a in range(AGENTS - 1)})


def test_a_lone_agent_terminal_is_refused(monkeypatch):
    env = MettaGridMultiAgentEnv({"config": arena_config(SHORT)})
    env.reset()
    pending = env._env.get_observations

    def one_done():
        obs, rewards, dones, truncateds, rows = pending()
        dones = dones.copy()
        dones[1] = 1.0
        return obs, rewards, dones, truncateds, rows

    monkeypatch.setattr(env._env, "get_observations", one_done)
    with pytest.raises(MettaError, match=r"agent\(s\) \[1\] terminated while their simulation goes on"):
        env.step({a: 0 for a in env.possible_agents})


def test_overlapping_and_inconsistent_chunks_are_refused(steps):
    seeds, actions, logps = steps
    chunks = [sa for ep in rllib_episodes(seeds, actions, logps) for sa in ep.agent_episodes.values()]
    with pytest.raises(MettaError, match="overlapping chunks"):
        pack_streams(chunks + chunks[:1], HORIZON)
    broken = MultiAgentEpisode(agent_to_module_mapping_fn=shared_module)
    info = {STREAM_KEY: (0, 0), STEP_KEY: 0}
    broken.add_env_reset(observations={"agent_0": chunks[0].get_observations()[0]}, infos={"agent_0": info})
    broken.add_env_step(observations={"agent_0": chunks[0].get_observations()[1]}, actions={"agent_0": 0},
                        rewards={"agent_0": 0.0}, infos={"agent_0": {STREAM_KEY: (0, 0), STEP_KEY: 5}},
                        extra_model_outputs={"agent_0": {Columns.ACTION_LOGP: np.float32(0)}})
    with pytest.raises(MettaError, match=r"expected one stream and consecutive steps"):
        pack_streams(list(broken.agent_episodes.values()), HORIZON)


def test_a_recurrent_policy_with_mettagrid_is_refused():
    from bridges.rllib.train import build_config
    from metta_core.run import TrainArgs

    with pytest.raises(MettaError, match=r"--policy lstm with --env mettagrid:arena-8: .*GridCNN only; use --policy mlp"):
        build_config(TrainArgs(framework="rllib", env="mettagrid:arena-8", policy="lstm"))


def test_cli_config_skips_action_normalization_for_discrete_grid_actions():
    from bridges.rllib.train import build_config
    from metta_core.run import TrainArgs

    config = build_config(TrainArgs(framework="rllib", env="mettagrid:arena-8"))
    assert config.normalize_actions is False  # sound only because every agent acts in a Discrete space:
    probe = MettaGridMultiAgentEnv({"env": "mettagrid:arena-8"})
    assert all(type(probe.get_action_space(agent)).__name__ == "Discrete" for agent in probe.possible_agents)
    probe.close()


def test_env_runner_stores_the_rollout_values_and_the_connector_uses_them(monkeypatch):
    """RLlib's MultiAgentEnvRunner keeps ``GridCNNModule``'s sampling ``VF_PREDS`` in the episodes; the
    connector takes them on every step slot (one value pass over the tails' bootstrap and padding slots
    only) and they equal the value pass of the same weights (atol 1e-6)."""
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner

    steps = STEPS - 4  # per agent: 5 full rows and a tail of 4 steps with its bootstrap slot
    config = module_config().environment(MettaGridMultiAgentEnv, env_config={"config": arena_config(SHORT), "seed": 5})
    runner = MultiAgentEnvRunner(config=config.env_runners(num_env_runners=0, num_envs_per_env_runner=ENVS),
                                 worker_index=0)
    learner = build_learner(config)
    runner.module.set_state(learner.module.get_state())
    episodes = runner.sample(num_timesteps=ENVS * AGENTS * steps, random_actions=False)
    runner.stop()
    chunks = [sa for ep in episodes for sa in ep.agent_episodes.values()]
    assert all(Columns.VF_PREDS in chunk.extra_model_outputs for chunk in chunks)
    module = learner.module[SHARED_MODULE_ID].unwrapped()
    calls, inner = [], module.compute_values
    monkeypatch.setattr(module, "compute_values", lambda batch, embeddings=None: calls.append(len(batch[Columns.OBS]))
                        or inner(batch, embeddings))
    connector = MettaLayoutConnector.from_config(learner.config)
    got = connector(rl_module=learner.module, batch={}, episodes=episodes)[SHARED_MODULE_ID]
    packed = pack_streams(chunks, HORIZON)
    mask = got[Columns.LOSS_MASK]
    assert int(mask.sum()) == ENVS * AGENTS * steps and calls == [len(mask) - int(mask.sum())]
    assert torch.equal(got[Columns.VF_PREDS][mask], torch.as_tensor(packed[Columns.VF_PREDS])[mask])
    tails = mask.reshape(-1, HORIZON)[-ENVS * AGENTS:]
    assert (tails.sum(axis=1) == 4).all() and not tails[:, -1].any()  # bootstrap slots in the last column
    with torch.no_grad():
        values = inner({Columns.OBS: got[Columns.OBS]})
    torch.testing.assert_close(got[Columns.VF_PREDS], values, atol=1e-6, rtol=0)
