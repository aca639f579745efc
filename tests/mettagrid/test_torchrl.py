"""MettaGrid in the TorchRL bridge: ``MettaGridEnv`` (agents as batch rows) against the core adapter,
GridCNN's init as TorchRL modules, ``--framework torchrl --env mettagrid:*`` runs, resume, errors."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("mettagrid", reason="needs the mettagrid extra: pip install 'metta-bridges[mettagrid]'")

from torchrl.collectors import Collector  # noqa: E402
from torchrl.envs.utils import check_env_specs  # noqa: E402

from bridges.cli import main  # noqa: E402
from bridges.torchrl.mettagrid import MettaGridEnv  # noqa: E402
from bridges.torchrl.train import TorchRLRun  # noqa: E402
from metta_core.envs.mettagrid import ArenaPreset, MettaGridEnvironment, arena_config, preset_config  # noqa: E402
from metta_core.errors import MettaError  # noqa: E402
from metta_core.run import CoreRun, TrainArgs  # noqa: E402

SHORT = ArenaPreset(num_agents=4, size=9, altars=6, walls=2, max_steps=5)
TINY = dict(env="mettagrid:arena-8", num_envs=2, batch_size=512, bptt_horizon=16, minibatch_size=256,
            update_epochs=1, progress=False)


def test_steps_and_resets_are_the_core_adapters_row_for_row():
    """Same seed, same actions: every row's observation, reward and flags equal the core adapter's,
    through TorchRL's step_and_maybe_reset across episode ends (same-step autoreset)."""
    core = MettaGridEnvironment(arena_config(SHORT), num_envs=2, seed=7)
    env = MettaGridEnv(MettaGridEnvironment(arena_config(SHORT), num_envs=2, seed=7))
    rng = np.random.default_rng(0)
    td = env.reset()
    assert td.batch_size == (8,)
    np.testing.assert_array_equal(td["observation"].numpy(), core.get_observations()[0])
    ends = 0
    for _ in range(12):  # two episode ends at max_steps 5
        actions = rng.integers(0, 5, 8)
        td["action"] = torch.from_numpy(actions)
        stepped, td = env.step_and_maybe_reset(td)
        core.send_actions(actions)
        obs, rewards, dones, truncateds, _ = core.get_observations()
        np.testing.assert_array_equal(stepped["next", "observation"].numpy(), obs)
        np.testing.assert_array_equal(td["observation"].numpy(), obs)  # the reset hands out the new episode as is
        np.testing.assert_array_equal(stepped["next", "reward"].numpy()[:, 0], rewards)
        np.testing.assert_array_equal(stepped["next", "terminated"].numpy()[:, 0], dones.astype(bool))
        np.testing.assert_array_equal(stepped["next", "truncated"].numpy()[:, 0], truncateds.astype(bool))
        ends += int(stepped["next", "done"].any())
    assert ends == 2


def test_specs_hold_and_the_collector_rows_are_agents_in_spec_order():
    env = MettaGridEnv(MettaGridEnvironment(arena_config(SHORT), num_envs=2, seed=1))
    check_env_specs(env)
    first = env.environment.get_observations()[0]
    collector = Collector(env, None, frames_per_batch=8 * 3, total_frames=-1)
    data = next(iter(collector))
    assert data.batch_size == (8, 3)  # [rows, steps]: row e * 4 + a is agent a of arena e
    np.testing.assert_array_equal(data["observation"][:, 0].numpy(), first)
    collector.shutdown()


def test_the_torchrl_policy_is_the_cores_grid_cnn_with_the_same_init(tmp_path):
    core = CoreRun(TrainArgs(framework="core", seed=3, out_dir=tmp_path, **TINY))
    run = TorchRLRun(TrainArgs(framework="torchrl", seed=3, out_dir=tmp_path, **TINY))
    core_params = [p for _, p in core.policy.named_parameters()]
    torchrl_params = [p for _, p in run.policy.named_parameters()]
    assert len(core_params) == len(torchrl_params) == 10
    for a, b in zip(core_params, torchrl_params):
        assert torch.equal(a, b)
    core.close()
    run.close()


def test_an_iteration_counts_agent_steps_and_logs_reward_per_agent_step(tmp_path):
    run = TorchRLRun(TrainArgs(framework="torchrl", out_dir=tmp_path, **TINY))
    assert run.env.batch_size == (16,) and run.curve_key == "reward_per_agent_step" and run.returns.target is None
    row = run.iteration()
    assert row["env_steps"] == 512 and 0.0 <= row["reward_per_agent_step"] <= 1.0
    run.close()


def test_resume_starts_fresh_episodes_and_pickles_no_simulator(tmp_path, caplog):
    first = TorchRLRun(TrainArgs(framework="torchrl", out_dir=tmp_path, **TINY))
    first.iteration()
    first.save(tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(pickle.loads(checkpoint["env_state"])["mettagrid"]) == {"episode_seeds", "finished"}
    resumed = TorchRLRun(TrainArgs(framework="torchrl", out_dir=tmp_path, **TINY))
    with caplog.at_level(logging.WARNING):
        resumed.load(tmp_path / "ckpt.pt", trust=True)
    assert "starts fresh episodes" in caplog.text
    for a, b in zip(first.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    fresh = resumed.env.environment.get_observations()[0]
    assert resumed.env_steps == 512 and resumed.epoch == 1
    assert resumed.iteration()["env_steps"] == 1024
    assert not np.array_equal(fresh, first.env.environment.get_observations()[0])  # new maps, not the old episode
    first.close()
    resumed.close()


def test_batch_sizes_that_do_not_fill_whole_agent_rows_are_refused(tmp_path):
    args = TrainArgs(framework="torchrl", out_dir=tmp_path, **{**TINY, "batch_size": 384, "minibatch_size": 128})
    with pytest.raises(MettaError, match=r"--batch-size 384 must be a multiple of 16 rows \(agents\) x --bptt-horizon 16"):
        TorchRLRun(args)


def test_compare_native_is_refused_for_mettagrid(tmp_path):
    with pytest.raises(MettaError, match="--compare-native is not available for --env mettagrid:arena-8"):
        TorchRLRun(TrainArgs(framework="torchrl", out_dir=tmp_path, **TINY), native=True)


def test_token_observations_are_refused_by_the_env():
    with pytest.raises(MettaError, match="obs='tokens'.*build it with obs='grid'"):
        MettaGridEnv(MettaGridEnvironment(preset_config("mettagrid:arena-8"), num_envs=1, seed=0, obs="tokens"))


@pytest.mark.slow
def test_cli_trains_mettagrid_with_torchrl_and_plots_reward_per_agent_step(tmp_path, capsys):
    argv = ["train", "--framework", "torchrl", "--env", "mettagrid:arena-8", "--num-envs", "2", "--batch-size", "512",
            "--bptt-horizon", "16", "--minibatch-size", "256", "--update-epochs", "1", "--total-timesteps", "1024",
            "--no-progress", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["framework"] == "torchrl" and summary["env_steps"] == 1024
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [512, 1024] and all("reward_per_agent_step" in r for r in rows)
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000


def test_a_pettingzoo_pipeline_trains_in_the_group_layout_without_restructuring():
    """mettagrid's own PettingZoo env through TorchRL's PettingZooWrapper (group "agents", [T, agents]
    entries) -> Collector -> rows of whole steps -> MettaPPOPhase: the loss and sampler fold the agents."""
    from tensordict.nn import TensorDictModule, TensorDictSequential
    from torch import nn
    from torchrl.envs import PettingZooWrapper
    from torchrl.modules import ProbabilisticActor, ValueOperator
    from mettagrid.envs.pettingzoo_env import MettaGridPettingZooEnv
    from mettagrid.simulator.simulator import Simulator

    from bridges.torchrl import MettaPPOLoss, MettaPPOPhase, MettaSegmentSampler

    class Tokens(nn.Module):
        def __init__(self, n_out: int) -> None:
            super().__init__()
            self.linear = nn.Linear(500 * 3, n_out)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.linear(tokens.flatten(-2).float() / 255)

    torch.manual_seed(0)
    pz = MettaGridPettingZooEnv(Simulator(), arena_config(SHORT))
    env = PettingZooWrapper(pz, group_map={"agents": list(pz.possible_agents)}, use_mask=False, categorical_actions=True)
    actor = ProbabilisticActor(
        TensorDictModule(Tokens(5), in_keys=[("agents", "observation")], out_keys=[("agents", "logits")]),
        in_keys=[("agents", "logits")], out_keys=[("agents", "action")],
        distribution_class=torch.distributions.Categorical, return_log_prob=True,
    )
    critic = ValueOperator(Tokens(1), in_keys=[("agents", "observation")], out_keys=[("agents", "state_value")])
    collector = Collector(env, TensorDictSequential(actor, critic), frames_per_batch=16, total_frames=-1,
                          auto_register_policy_transforms=False)
    data = next(iter(collector))
    collector.shutdown()
    assert data.batch_size == (16,) and data["agents"].batch_size == (16, 4)
    loss = MettaPPOLoss(actor, critic)
    loss.set_keys(reward=("agents", "reward"), terminated=("agents", "terminated"), done=("agents", "done"),
                  value=("agents", "state_value"))
    before = [p.detach().clone() for p in loss.parameters()]
    sampler = MettaSegmentSampler(loss, minibatch_segments=4, total_timesteps=1000,
                                  generator=torch.Generator().manual_seed(0))
    phase = MettaPPOPhase(loss, torch.optim.Adam(loss.parameters(), lr=1e-3), sampler)
    stats = phase(data.reshape(-1, 8), epoch=0)  # [2, 8] rows of steps, 4 agents each -> 8 rows
    assert np.isfinite(stats["policy_loss"]) and phase.epochs_trained == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, loss.parameters()))
