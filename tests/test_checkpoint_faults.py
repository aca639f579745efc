"""Fault tests (issue 16): a SIGKILL in the middle of writing a checkpoint loses nothing, and a run
resumed after the kill continues with the same numbers as an uninterrupted one (core and TorchRL).

The kill lands mid-save deterministically through ``PAUSE_BEFORE_RENAME_ENV``: the writer announces
on stderr that the temporary file is written and sleeps before renaming it into place.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bridges.cli import main
from metta_core.run import PAUSE_BEFORE_RENAME_ENV, TrainArgs, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--no-progress", "--num-envs", "2", "--batch-size", "64", "--bptt-horizon", "16", "--minibatch-size", "32",
        "--update-epochs", "2", "--hidden-size", "8", "--target-return", "475", "--no-stop-at-target", "--seed", "7"]
ITERATION = 64
"""Env steps per iteration of ``TINY``."""


def cli(framework: str, out_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--framework", framework, "--out-dir", str(out_dir), "--total-timesteps", str(steps), *TINY, *extra]


def run_cli(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0


def rows(out_dir: Path) -> list[dict]:
    """The metrics rows without the wall-clock column."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_second"} for line in lines]


def kill_while_saving(argv: list[str]) -> None:
    """Run the CLI in a subprocess, SIGKILL it while it pauses between writing and renaming its first
    checkpoint."""
    env = {**os.environ, PAUSE_BEFORE_RENAME_ENV: "120", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "bridges.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "checkpoint test hook" in line:
                break
        else:
            pytest.fail(f"the run ended (exit {proc.wait()}) without reaching a checkpoint")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["core", "torchrl"])
def test_kill_mid_save_keeps_the_last_checkpoint_and_resume_continues_identically(tmp_path, framework):
    ckpt = tmp_path / "ckpt.pt"
    # uninterrupted reference: 4 iterations
    run_cli(cli(framework, tmp_path / "straight", 4 * ITERATION))
    # 2 iterations, then a checkpoint
    run_cli(cli(framework, tmp_path / "resumed", 2 * ITERATION, "--save-checkpoint", str(ckpt)))
    before = ckpt.read_bytes()
    # a resumed run is killed while writing its next checkpoint (after iteration 3)
    kill_while_saving(cli(framework, tmp_path / "killed", 4 * ITERATION, "--resume", str(ckpt), "--trust-checkpoint",
                          "--save-checkpoint", str(ckpt), "--checkpoint-every", "1"))
    assert ckpt.read_bytes() == before, "the kill changed the last good checkpoint"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.pt.")]
    assert leftovers, "the kill should have landed after the temporary file was written"
    state, env_state = read_checkpoint(ckpt, TrainArgs(framework=framework, trust_checkpoint=True,
                                                       **_tiny_settings()), framework)
    assert env_state is not None and state["epoch"] == 2
    torch.load(ckpt, weights_only=True)  # the safe part loads on its own
    # resume after the kill: iterations 3 and 4 are the uninterrupted run's, number for number
    run_cli(cli(framework, tmp_path / "resumed", 4 * ITERATION, "--resume", str(ckpt), "--trust-checkpoint"))
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")


def _tiny_settings() -> dict:
    return dict(num_envs=2, batch_size=64, bptt_horizon=16, minibatch_size=32, update_epochs=2, hidden_size=8, seed=7)
