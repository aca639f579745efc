"""The TorchRL training run: collector loop, exact resume, CLI hook, the native comparison."""

import json
import math

import pytest
import torch

from bridges.torchrl.train import TorchRLRun, train
from metta_core.errors import MettaError
from metta_core.run import TrainArgs, phase_learning_rate

TINY = dict(framework="torchrl", num_envs=4, batch_size=256, bptt_horizon=32, minibatch_size=64,
            update_epochs=2, hidden_size=16, progress=False, target_return=None)


def params_of(run):
    return [p.detach().clone() for p in run.loss.parameters()]


def test_resume_continues_exactly(tmp_path):
    args = TrainArgs(**TINY, out_dir=tmp_path, total_timesteps=10_000, seed=3)
    straight = TorchRLRun(args)
    straight.iteration()
    straight.save(tmp_path / "ckpt.pt")
    rows = [straight.iteration(), straight.iteration()]
    expected = params_of(straight)
    straight.close()

    resumed = TorchRLRun(args)
    resumed.load(tmp_path / "ckpt.pt", trust=True)
    again = [resumed.iteration(), resumed.iteration()]
    resumed.close()
    for a, b in zip(rows, again):
        a.pop("steps_per_second"), b.pop("steps_per_second")
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a), (a, b)
    assert all(torch.equal(p, q) for p, q in zip(expected, params_of(resumed)))


def test_train_hook_writes_metrics_checkpoint_and_resumes(tmp_path):
    ckpt = tmp_path / "run.pt"
    first = train(TrainArgs(**TINY, out_dir=tmp_path, total_timesteps=512, save_checkpoint=ckpt))
    assert first["env_steps"] == 512 and ckpt.exists()
    second = train(TrainArgs(**TINY, out_dir=tmp_path, total_timesteps=1024, resume=ckpt))
    assert second["env_steps"] == 1024
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [256, 512, 768, 1024]
    assert {"episode_return_mean", "policy_loss", "value_loss", "entropy", "approx_kl"} <= rows[-1].keys()
    assert (tmp_path / "learning_curve.png").exists()
    with pytest.raises(MettaError, match="checkpoint was made with"):
        train(TrainArgs(**{**TINY, "hidden_size": 32}, out_dir=tmp_path, total_timesteps=2048, resume=ckpt))


def test_native_clip_ppo_comparison_runs(tmp_path):
    summary = train(TrainArgs(**TINY, out_dir=tmp_path, total_timesteps=512, compare_native=True))
    rows = [json.loads(line) for line in (tmp_path / "native" / "metrics.jsonl").read_text().splitlines()]
    assert summary["framework"] == "torchrl" and summary["native"]["framework"] == "torchrl-native"
    assert math.isfinite(rows[-1]["loss_objective"]) and (tmp_path / "metrics.jsonl").exists()


def test_batch_must_split_into_rows(tmp_path):
    with pytest.raises(MettaError, match=r"--batch-size 192 must be a multiple of \d+ rows \(envs\) x --bptt-horizon"):
        TorchRLRun(TrainArgs(**{**TINY, "batch_size": 192}, out_dir=tmp_path))


@pytest.mark.slow
def test_collector_run_beats_random(tmp_path):
    """A random CartPole policy averages ~22 per episode; 16 iterations of Metta PPO clearly beat it."""
    args = TrainArgs(framework="torchrl", num_envs=16, batch_size=2048, bptt_horizon=32, minibatch_size=512,
                     update_epochs=4, learning_rate=1e-3, total_timesteps=16 * 2048, progress=False,
                     target_return=None, out_dir=tmp_path, seed=1)
    summary = train(args)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["episode_return_mean"] > 45, summary
    assert rows[-1]["episode_return_mean"] > 1.5 * rows[0]["episode_return_mean"]


@pytest.mark.parametrize("native", [False, True], ids=["metta", "clip_ppo"])
def test_anneal_lr_steps_with_the_cores_schedule(tmp_path, native):
    """--anneal-lr was once ignored here (a constant rate, silently): every optimizer step of a
    phase must use ``phase_learning_rate`` of the steps taken before that phase's rollout."""
    args = TrainArgs(**TINY, out_dir=tmp_path, total_timesteps=1024, anneal_lr=True, learning_rate=0.002)
    run = TorchRLRun(args, native=native)
    used = []
    step = run.optimizer.step
    run.optimizer.step = lambda *a, **k: (used.append(run.optimizer.param_groups[0]["lr"]), step(*a, **k))[1]
    for _ in range(3):
        before = len(used)
        run.iteration()
        rate = phase_learning_rate(args, run.env_steps - 256)
        assert len(used) > before and set(used[before:]) == {rate}
    run.close()
    assert [0.002 * (1 - s / 1024) for s in (0, 256, 512)] == sorted(set(used), reverse=True)
