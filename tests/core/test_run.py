"""The core training run: checkpoint/resume continues exactly; CLI; CartPole learns."""

import json

import pytest
import torch

from bridges.cli import main
from metta_core.run import CoreRun, TrainArgs, phase_learning_rate, train

SMALL = dict(num_envs=4, batch_size=256, bptt_horizon=16, minibatch_size=64, update_epochs=2, progress=False,
             learning_rate=1e-3, hidden_size=16, target_return=None)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    straight = CoreRun(TrainArgs(**SMALL, out_dir=tmp_path / "a"))
    rows_straight = [straight.iteration() for _ in range(4)]

    first = CoreRun(TrainArgs(**SMALL, out_dir=tmp_path / "b"))
    rows = [first.iteration() for _ in range(2)]
    first.save(tmp_path / "ckpt.pt")
    torch.manual_seed(999)  # whatever happens in between must not matter
    resumed = CoreRun(TrainArgs(**SMALL, seed=5, out_dir=tmp_path / "b"))
    resumed.load(tmp_path / "ckpt.pt", trust=True)  # the env's mid-episode state too
    rows += [resumed.iteration() for _ in range(2)]

    for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    for ra, rb in zip(rows_straight, rows):
        ra.pop("steps_per_second"), rb.pop("steps_per_second")
        assert ra == rb


def test_train_writes_metrics_curve_and_checkpoint(tmp_path):
    args = TrainArgs(**SMALL, total_timesteps=512, out_dir=tmp_path, metrics_format="csv", save_checkpoint=tmp_path / "c.pt")
    summary = train(args)
    assert summary["env_steps"] == 512
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("env_steps,") and len(lines) == 3
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    checkpoint = torch.load(tmp_path / "c.pt", weights_only=True)  # safe to load: no pickled objects
    state = checkpoint["state"]
    assert checkpoint["framework"] == "core" and checkpoint["settings"]["total_timesteps"] == 512
    assert state["epoch"] == 2 and set(state["losses"]["ppo"]) == {"loss_tracker", "anneal_beta", "burn_in_steps_iter"}


def test_phase_learning_rate_decays_linearly_to_zero_once_per_phase():
    args = TrainArgs(learning_rate=0.003, total_timesteps=1000, anneal_lr=True)
    assert [phase_learning_rate(args, s) for s in (0, 250, 1000, 1500)] == [0.003, 0.003 * 0.75, 0.0, 0.0]
    assert phase_learning_rate(TrainArgs(learning_rate=0.003, total_timesteps=1000), 750) == 0.003


def test_anneal_lr_every_optimizer_step_of_a_phase_uses_the_phase_rate(tmp_path):
    args = TrainArgs(**{**SMALL, "learning_rate": 0.002}, total_timesteps=1024, anneal_lr=True, out_dir=tmp_path)
    run = CoreRun(args)
    used = []
    step = run.optimizer.step
    run.optimizer.step = lambda *a, **k: (used.append(run.optimizer.param_groups[0]["lr"]), step(*a, **k))[1]
    for before in (0, 256, 512):
        start = len(used)
        run.iteration()
        assert len(used) > start and set(used[start:]) == {0.002 * (1 - before / 1024)}


def test_cli_reports_bad_override(capsys):
    assert main(["train", "--ppo", "vtrace.rho_clp=0.5", "--no-progress"]) == 2
    assert "no field 'rho_clp'" in capsys.readouterr().err


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope.pt"), "--out-dir", str(tmp_path), "--no-progress"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_cartpole_return_rises_well_above_random(tmp_path, capsys):
    # a random CartPole policy averages about 22
    code = main(["train", "--framework", "core", "--total-timesteps", "40000", "--out-dir", str(tmp_path), "--no-progress",
                 "--batch-size", "512", "--bptt-horizon", "16", "--minibatch-size", "128", "--learning-rate", "1e-3"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episode_return_mean"] > 100, summary


def test_non_flat_box_observations_are_refused_by_name(tmp_path):
    import gymnasium as gym

    from metta_core.errors import MettaError
    from metta_core.run import preflight

    class GridObs(gym.Env):
        observation_space = gym.spaces.Box(0, 1, (3, 4))
        action_space = gym.spaces.Discrete(2)

    gym.register("MettaTestGridObs-v0", entry_point=lambda: GridObs())
    try:
        for framework in ("core", "torchrl", "rllib"):
            with pytest.raises(MettaError, match=r"MettaTestGridObs-v0.*shape \(features,\).*FlattenObservation"):
                preflight(TrainArgs(framework=framework, env="MettaTestGridObs-v0", out_dir=tmp_path, progress=False))
    finally:
        gym.registry.pop("MettaTestGridObs-v0")
