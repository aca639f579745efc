"""Checkpoints: safe to load, written atomically, verified on resume, env state opt-in (issue 16)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from metta_core.errors import MettaError
from metta_core.run import (
    CHECKPOINT_FORMAT, CoreRun, TrainArgs, make_checkpoint, read_checkpoint, save_checkpoint,
)

SMALL = dict(num_envs=2, batch_size=64, bptt_horizon=16, minibatch_size=32, update_epochs=1, progress=False,
             hidden_size=8, target_return=None)


@pytest.fixture
def saved(tmp_path) -> tuple[CoreRun, Path]:
    """A core run after two iterations and its checkpoint."""
    run = CoreRun(TrainArgs(**SMALL, out_dir=tmp_path))
    run.iteration(), run.iteration()
    run.save(tmp_path / "ckpt.pt")
    return run, tmp_path / "ckpt.pt"


def test_checkpoint_loads_with_weights_only_and_records_its_settings(saved):
    run, path = saved
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["version"] == 1
    assert checkpoint["framework"] == "core" and checkpoint["env"] == "CartPole-v1"
    assert checkpoint["settings"]["hidden_size"] == 8 and checkpoint["settings"]["out_dir"] == str(run.args.out_dir)
    assert checkpoint["shapes"]["actor.0.weight"] == [8, 4]
    assert isinstance(checkpoint["env_state"], bytes)  # opaque unless trusted
    assert checkpoint["state"]["epoch"] == 2


def test_a_second_save_replaces_the_file_and_leaves_no_temporary(saved):
    run, path = saved
    run.iteration()
    run.save(path)
    assert os.listdir(path.parent) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True)["state"]["epoch"] == 3


def test_a_failed_write_keeps_the_previous_checkpoint(saved, monkeypatch):
    run, path = saved
    before = path.read_bytes()

    def write_half_then_fail(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        run.save(path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["ckpt.pt"]  # the temporary file is removed


def test_resume_without_trust_restores_all_but_the_env(saved, tmp_path):
    run, path = saved
    resumed = CoreRun(TrainArgs(**SMALL, out_dir=tmp_path))
    resumed.load(path)
    for a, b in zip(run.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.context.epoch == 2 and resumed.env_steps == run.env_steps
    assert resumed.returns.state_dict() == run.returns.state_dict()
    assert not np.array_equal(resumed.env._pending[0], run.env._pending[0])  # fresh episodes
    assert resumed.iteration()["env_steps"] == run.env_steps + 64


def test_resume_with_trust_restores_the_env(saved, tmp_path):
    run, path = saved
    resumed = CoreRun(TrainArgs(**SMALL, out_dir=tmp_path, trust_checkpoint=True))
    resumed.load(path)
    assert np.array_equal(resumed.env._pending[0], run.env._pending[0])


def test_the_resumed_run_uses_its_own_learning_rate(saved, tmp_path):
    _, path = saved
    resumed = CoreRun(TrainArgs(**{**SMALL, "learning_rate": 3e-4}, out_dir=tmp_path))
    resumed.load(path)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [3e-4]


@pytest.mark.parametrize("change, flag", [({"env": "Acrobot-v1"}, "--env"), ({"hidden_size": 16}, "--hidden-size"),
                                          ({"num_envs": 4, "batch_size": 128}, "--num-envs"),
                                          ({"ppo": {"gamma": 0.9}}, "--ppo"), ({"policy": "lstm"}, "--policy")])
def test_a_resume_that_changes_an_incompatible_setting_is_refused(saved, change, flag):
    _, path = saved
    args = TrainArgs(**{**SMALL, **change})
    with pytest.raises(MettaError, match=rf"checkpoint was made with {flag} .*this run"):
        read_checkpoint(path, args, "core")


def test_another_format_version_or_framework_is_refused(tmp_path):
    args = TrainArgs(**SMALL)
    header = make_checkpoint("core", args, {"policy": {}}, None)
    save_checkpoint({**header, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(MettaError, match="format version 99, this version reads 1"):
        read_checkpoint(tmp_path / "v99.pt", args, "core")
    with pytest.raises(MettaError, match="made by --framework core.*resume it with --framework core"):
        read_checkpoint(_saved(tmp_path / "c.pt", header), args, "torchrl")


def _saved(path: Path, checkpoint: dict) -> Path:
    save_checkpoint(checkpoint, path)
    return path


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_runs_pickled_code_unless_trusted(tmp_path):
    args = TrainArgs(**SMALL)
    marker = tmp_path / "pwned"
    # a payload in the env state: inert without --trust-checkpoint
    checkpoint = make_checkpoint("core", args, {"policy": {}}, _Payload(marker))
    read_checkpoint(_saved(tmp_path / "env.pt", checkpoint), args, "core")
    assert not marker.exists()
    # a payload in the outer file: weights_only refuses it
    torch.save({**checkpoint, "state": _Payload(marker)}, tmp_path / "outer.pt")
    with pytest.raises(MettaError, match="unsafe to unpickle"):
        read_checkpoint(tmp_path / "outer.pt", args, "core")
    assert not marker.exists()
    # trusted: the env state is unpickled (so only for checkpoints you trust)
    read_checkpoint(tmp_path / "env.pt", TrainArgs(**SMALL, trust_checkpoint=True), "core")
    assert marker.exists()


def test_rllib_checkpoint_folders_are_verified_before_ray_starts(tmp_path):
    import json

    from bridges.rllib.train import HEADER_FILE, verify_rllib_checkpoint
    from metta_core.run import checkpoint_header

    args = TrainArgs(framework="rllib")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(MettaError, match=f"no {HEADER_FILE}"):
        verify_rllib_checkpoint(folder, args)
    (folder / HEADER_FILE).write_text(json.dumps(checkpoint_header("rllib", args)))
    with pytest.raises(MettaError, match="--trust-checkpoint"):
        verify_rllib_checkpoint(folder, args)
    verify_rllib_checkpoint(folder, TrainArgs(framework="rllib", trust_checkpoint=True))
    with pytest.raises(MettaError, match="--env 'CartPole-v1' \\(this run: 'Acrobot-v1'\\)"):
        verify_rllib_checkpoint(folder, TrainArgs(framework="rllib", env="Acrobot-v1", trust_checkpoint=True))
