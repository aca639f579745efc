"""`metta-bridges train --framework rllib --env mettagrid:arena-8`: agent-step batches, reward per
agent-step, the learning curve, and a resume that starts fresh episodes (no simulator in the checkpoint)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("mettagrid", reason="needs the mettagrid extra: pip install 'metta-bridges[mettagrid]'")

from bridges.rllib.train import HEADER_FILE, train  # noqa: E402
from metta_core.run import TrainArgs  # noqa: E402
from metta_core.runlog import REWARD_RATE_KEY  # noqa: E402


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_run_counts_agent_steps_and_resumes_with_fresh_episodes(tmp_path, capfd):
    args = TrainArgs(framework="rllib", env="mettagrid:arena-8", num_envs=1, batch_size=512, bptt_horizon=32,
                     minibatch_size=256, update_epochs=1, total_timesteps=1024, progress=False,
                     out_dir=tmp_path / "run", save_checkpoint=tmp_path / "ckpt")
    summary = train(args)
    first = rows(tmp_path / "run")
    # 8 agents: 64 steps per iteration make the 512 agent-steps of a batch
    assert [r["env_steps"] for r in first] == [512, 1024] and summary["env_steps"] == 1024
    assert all(0.0 <= r[REWARD_RATE_KEY] < 1.0 and math.isfinite(r["policy_loss"]) for r in first)
    assert (tmp_path / "run" / "learning_curve.png").is_file() and (tmp_path / "ckpt" / HEADER_FILE).is_file()

    resumed = TrainArgs(**{**args.__dict__, "total_timesteps": 1536, "out_dir": tmp_path / "resumed",
                           "resume": tmp_path / "ckpt", "trust_checkpoint": True, "save_checkpoint": None})
    capfd.readouterr()
    assert train(resumed)["env_steps"] == 1536
    assert "MettaGrid simulators are not in checkpoints; the resumed run starts fresh episodes" in capfd.readouterr().err
    assert [r["env_steps"] for r in rows(tmp_path / "resumed")] == [1536]
