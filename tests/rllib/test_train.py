"""bridges.rllib.train: whole-episode returns from chunked episodes (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

from bridges.rllib.train import AGENT_STEPS_KEY, EPISODE_RETURNS_KEY, REWARD_SUM_KEY, EpisodeReturns


class Logger:
    def __init__(self):
        self.values = []
        self.series = {REWARD_SUM_KEY: [], AGENT_STEPS_KEY: []}

    def log_value(self, key, value, reduce=None):
        assert reduce == "item_series"
        (self.values if key == EPISODE_RETURNS_KEY else self.series[key]).append(value)


class Chunk(SimpleNamespace):
    def __len__(self):
        return self.length


def chunk(id_, ret, done, length=10):
    return Chunk(id_=id_, is_done=done, get_return=lambda: ret, length=length)


def multi_agent_chunk(id_, returns, done, length=10):
    """A MultiAgentEpisode chunk: ``agent_episodes`` of single-agent chunks with the given returns."""
    agents = {f"agent_{i}": chunk(f"{id_}-{i}", ret, done, length) for i, ret in enumerate(returns)}
    return SimpleNamespace(id_=id_, is_done=done, agent_episodes=agents)


def test_episode_spanning_fragments_reports_its_whole_return():
    callback, logger = EpisodeReturns(), Logger()
    callback.on_episode_end(episode=chunk("a", 12.0, True), metrics_logger=logger)
    callback.on_sample_end(samples=[chunk("a", 12.0, True), chunk("b", 64.0, False)])
    callback.on_sample_end(samples=[chunk("b", 64.0, False)])  # b runs through a whole fragment
    callback.on_episode_end(episode=chunk("b", 30.0, True), metrics_logger=logger)
    assert logger.values == [12.0, 158.0]


def test_anneal_lr_is_rllibs_linear_lr_schedule_to_zero_at_total_timesteps():
    from bridges.rllib.train import build_config
    from metta_core.run import TrainArgs

    config = build_config(TrainArgs(framework="rllib", learning_rate=0.002, anneal_lr=True, total_timesteps=50_000))
    assert config.lr == [[0, 0.002], [50_000, 0.0]]
    assert build_config(TrainArgs(framework="rllib", learning_rate=0.002)).lr == 0.002


def test_recurrent_policy_uses_the_core_network_and_a_module_importable_env_id():
    from bridges.rllib.recurrent import MettaRecurrentModule
    from bridges.rllib.train import build_config
    from metta_core.run import TrainArgs

    config = build_config(TrainArgs(framework="rllib", policy="gru", env="CartPoleNoVel-v1", hidden_size=32,
                                    bptt_horizon=16, seed=3))
    assert config.rl_module_spec.module_class is MettaRecurrentModule
    assert {k: config.model_config[k] for k in ("cell", "hidden_size", "seed", "max_seq_len")} == {
        "cell": "gru", "hidden_size": 32, "seed": 3, "max_seq_len": 16}
    assert config.env == "metta_core.cartpole_no_velocity:CartPoleNoVel-v1"  # remote runners import it


def test_multi_agent_episodes_report_each_agents_return_and_the_reward_per_agent_step():
    """MettaGrid: one return per agent (the core's per-agent episode return), and per sample() the
    summed rewards and agent-steps behind reward_per_agent_step."""
    callback, logger = EpisodeReturns(), Logger()
    callback.on_sample_end(samples=[multi_agent_chunk("m", [1.0, 2.0], False, length=64)], metrics_logger=logger)
    callback.on_episode_end(episode=multi_agent_chunk("m", [3.0, 0.0], True, length=36), metrics_logger=logger)
    callback.on_sample_end(samples=[multi_agent_chunk("m", [3.0, 0.0], True, length=36)], metrics_logger=logger)
    assert logger.values == [4.0, 2.0]
    assert logger.series == {REWARD_SUM_KEY: [3.0, 3.0], AGENT_STEPS_KEY: [128, 72]}
