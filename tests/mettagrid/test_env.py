"""MettaGridEnvironment: agents as rows, SPEC §1 layout with same-step autoreset, copied observations,
the dense grid against a slow reference, resume with fresh episodes, and every bad input."""

import logging

import numpy as np
import pytest

pytest.importorskip("mettagrid", reason="needs the mettagrid extra: pip install 'metta-bridges[mettagrid]'")

from metta_core.envs import make_training_env  # noqa: E402
from metta_core.envs.mettagrid import (  # noqa: E402
    PRESETS, ArenaPreset, MettaGridEnvironment, arena_config, preset_config, tokens_to_grid,
)
from metta_core.errors import MettaError  # noqa: E402

SHORT = ArenaPreset(num_agents=4, size=9, altars=6, walls=2, max_steps=5)


def grid_loop(tokens, num_features, height, width):
    """Slow reference of GridObsWrapper's scatter (before its normalization), token by token."""
    grid = np.zeros((tokens.shape[0], num_features, height, width), np.uint8)
    for row in range(tokens.shape[0]):
        for location, feature, value in tokens[row]:
            if location == 0xFF:
                continue
            y, x = (height // 2, width // 2) if location == 0xFE else (location >> 4, location & 15)
            if y < height and x < width and feature < num_features:
                grid[row, feature, y, x] = value
    return grid


def random_actions(env, rng):
    return rng.integers(0, env.single_action_space.n, env.num_agents)


def test_grid_matches_the_token_loop_on_real_and_edge_tokens():
    env = MettaGridEnvironment(preset_config("mettagrid:arena-8"), num_envs=2, seed=0, obs="tokens")
    rng = np.random.default_rng(0)
    for _ in range(3):
        env.send_actions(random_actions(env, rng))
    tokens = env.get_observations()[0]
    edge = np.full((1, tokens.shape[1], 3), 0xFF, np.uint8)
    edge[0, :5] = [[0xFE, 3, 7], [0x2C, 1, 9], [0xDD, 2, 4], [0x00, 60, 5], [0x66, 0, 200]]  # global, ok, out of window, bad feature
    tokens = np.concatenate([tokens, edge])
    expected = grid_loop(tokens, 52, 13, 13)
    assert expected[-1].sum() == 7 + 9 + 200
    np.testing.assert_array_equal(tokens_to_grid(tokens, 52, 13, 13), expected)


def test_rows_are_agents_of_every_env_and_envs_differ():
    env = make_training_env("mettagrid:arena-8", num_envs=3, seed=0)
    obs, rewards, dones, truncateds, rows = env.get_observations()
    assert env.num_agents == 24 and rows == slice(0, 24)
    assert obs.shape == (24, *env.single_observation_space.shape) and obs.dtype == np.uint8
    assert rewards.shape == dones.shape == truncateds.shape == (24,)
    assert not np.array_equal(obs[:8], obs[8:16])


def test_observations_are_copies_not_views_of_the_simulator_buffer():
    for mode in ("grid", "tokens"):
        env = MettaGridEnvironment(preset_config("mettagrid:arena-8"), num_envs=1, seed=0, obs=mode)
        first = env.get_observations()[0]
        kept = first.copy()
        env.send_actions(np.full(8, 1))
        assert np.array_equal(first, kept), mode
        assert not np.array_equal(env.get_observations()[0], kept), mode


def test_same_seed_same_stream_and_reward_rate_is_the_mean_reward():
    a, b = (MettaGridEnvironment(arena_config(SHORT), num_envs=2, seed=7) for _ in range(2))
    rng = np.random.default_rng(1)
    total = 0.0
    for _ in range(12):
        actions = random_actions(a, rng)
        a.send_actions(actions)
        b.send_actions(actions)
        for x, y in zip(a.get_observations()[:4], b.get_observations()[:4]):
            np.testing.assert_array_equal(x, y)
        total += a.get_observations()[1].sum()
    assert a.pop_reward_rate() == pytest.approx(total / (12 * 8))
    assert np.isnan(a.pop_reward_rate())


def test_same_step_autoreset_follows_spec_layout():
    """The step that ends an episode hands out the next episode's first observation with the
    ending transition's reward and terminal flag; episodes are reported per agent."""
    env = MettaGridEnvironment(arena_config(SHORT), num_envs=2, seed=3)
    next_episodes = MettaGridEnvironment(arena_config(SHORT), num_envs=2, seed=3)
    next_episodes.load_state_dict(next_episodes.state_dict())  # draws the seeds of the second episodes
    rng = np.random.default_rng(0)
    rewards_seen = np.zeros(8)
    for step in range(1, 6):
        env.send_actions(random_actions(env, rng))
        obs, rewards, dones, truncateds, _ = env.get_observations()
        rewards_seen += rewards
        assert dones.all() == (step == 5) and not truncateds.any()
    np.testing.assert_array_equal(obs, next_episodes.get_observations()[0])
    returns, lengths = env.pop_finished_episodes()
    assert lengths == [5] * 8
    np.testing.assert_allclose(returns, rewards_seen)
    assert env.pop_finished_episodes() == ([], [])
    env.send_actions(random_actions(env, rng))
    assert not env.get_observations()[2].any()


def test_resume_starts_fresh_episodes_marked_truncated(caplog):
    env = MettaGridEnvironment(arena_config(SHORT), num_envs=1, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(7):
        env.send_actions(random_actions(env, rng))
    state = env.state_dict()
    assert "episode_seeds" in state and not any("sim" in k for k in state)
    twin = MettaGridEnvironment(arena_config(SHORT), num_envs=1, seed=99)
    with caplog.at_level(logging.WARNING):
        twin.load_state_dict(state)
    assert "starts fresh episodes" in caplog.text
    obs, rewards, dones, truncateds, _ = twin.get_observations()
    assert truncateds.all() and not dones.any() and not rewards.any()
    # the episode generator continues where the saved one was: both now build the same map
    env.load_state_dict(state)
    np.testing.assert_array_equal(env.get_observations()[0], obs)
    assert twin.pop_finished_episodes() == env.pop_finished_episodes()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_pay_rewards_to_random_agents(name):
    env = make_training_env(f"mettagrid:{name}", num_envs=1, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        env.send_actions(random_actions(env, rng))
    assert env.pop_reward_rate() > 0.005


def test_configs_the_adapter_cannot_serve():
    config = preset_config("mettagrid:arena-8")
    with pytest.raises(MettaError, match="needs a mettagrid MettaGridConfig, got dict"):
        MettaGridEnvironment({"game": {}}, 1, 0)
    with pytest.raises(MettaError, match="obs must be one of"):
        MettaGridEnvironment(config, 1, 0, obs="pixels")
    with pytest.raises(MettaError, match="num_envs must be >= 1"):
        MettaGridEnvironment(config, 0, 0)
    wide = config.model_copy(deep=True)
    wide.game.obs.width = wide.game.obs.height = 17
    with pytest.raises(MettaError, match="at most 15x15.*got game.obs 17x17.*obs='tokens'"):
        MettaGridEnvironment(wide, 1, 0)
    vibes = config.model_copy(deep=True)
    vibes.game.vibe_names = ["default", "happy"]
    vibes.game.actions.change_vibe.enabled = True
    with pytest.raises(MettaError, match="change_vibe.enabled = False"):
        MettaGridEnvironment(vibes, 1, 0)
    with pytest.raises(MettaError, match="unknown MettaGrid preset 'mettagrid:arena-9'.*mettagrid:arena-8"):
        preset_config("mettagrid:arena-9")
    env = MettaGridEnvironment(config, 1, 0)
    with pytest.raises(MettaError, match="expects 8 actions .* got shape \\(3,\\)"):
        env.send_actions(np.zeros(3, np.int64))
