"""`metta-bridges train --framework core --env mettagrid:arena-8`: CNN policy, reward per agent-step
curve, no CartPole target, resume with fresh episodes and no pickled simulator."""

import json
import logging
import pickle

import pytest
import torch

pytest.importorskip("mettagrid", reason="needs the mettagrid extra: pip install 'metta-bridges[mettagrid]'")

from bridges.cli import main  # noqa: E402
from metta_core.cnn_policy import GridCNN  # noqa: E402
from metta_core.envs.mettagrid import MettaGridEnvironment, preset_config  # noqa: E402
from metta_core.run import CoreRun, TrainArgs, train  # noqa: E402

TINY = dict(env="mettagrid:arena-8", num_envs=2, batch_size=512, bptt_horizon=16, minibatch_size=256,
            update_epochs=1, progress=False)


def test_core_run_takes_any_training_environment(tmp_path):
    env = MettaGridEnvironment(preset_config("mettagrid:arena-8"), num_envs=1, seed=3)
    run = CoreRun(TrainArgs(**TINY, out_dir=tmp_path), env=env)
    assert run.env is env and run.experience.total_agents == 8
    assert isinstance(run.policy, GridCNN)
    assert run.returns.target is None  # CartPole's 475 is not a MettaGrid target
    row = run.iteration()
    assert row["env_steps"] == 512 and 0.0 <= row["reward_per_agent_step"] <= 1.0
    run.close()


def test_an_explicit_target_return_is_kept(tmp_path):
    run = CoreRun(TrainArgs(**TINY, target_return=150.0, out_dir=tmp_path))
    assert run.returns.target == 150.0
    run.close()


def test_resume_restores_all_but_the_episode_and_pickles_no_simulator(tmp_path, caplog):
    first = CoreRun(TrainArgs(**TINY, out_dir=tmp_path))
    first.iteration()
    first.save(tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(pickle.loads(checkpoint["env_state"])) == {"episode_seeds", "finished"}
    resumed = CoreRun(TrainArgs(**TINY, out_dir=tmp_path))
    with caplog.at_level(logging.WARNING):
        resumed.load(tmp_path / "ckpt.pt", trust=True)
    assert "starts fresh episodes" in caplog.text
    for a, b in zip(first.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.env_steps == 512 and resumed.context.epoch == 1
    assert resumed.env.get_observations()[3].all()  # the cut episodes are marked truncated
    assert resumed.iteration()["env_steps"] == 1024
    first.close()
    resumed.close()


@pytest.mark.slow
def test_cli_trains_mettagrid_and_plots_reward_per_agent_step(tmp_path, capsys):
    argv = ["train", "--framework", "core", "--env", "mettagrid:arena-8", "--num-envs", "2", "--batch-size", "512",
            "--bptt-horizon", "16", "--minibatch-size", "256", "--update-epochs", "1", "--total-timesteps", "1024",
            "--no-progress", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["env_steps"] == 1024
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [512, 1024] and all("reward_per_agent_step" in r for r in rows)
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
