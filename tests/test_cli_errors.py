"""The CLI's user errors: one line on stderr, exit status 2, no traceback unless ``--debug`` (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridges.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad, named", [(["--env", "NoSuchEnv-v9"], "--env 'NoSuchEnv-v9'"),
                                        (["--num-envs", "0"], "--num-envs must be an integer >= 1, got 0")])
def test_a_real_process_reports_one_line_and_exits_2(tmp_path, bad, named):
    """As a user runs it (a fresh process): the commands the project's before-stop hook checks."""
    proc = subprocess.run(
        [sys.executable, "-m", "bridges.cli", "train", *bad, "--no-progress", "--total-timesteps", "64",
         "--out-dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("metta-bridges: error: ") and named in proc.stderr


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["train", "--debug", "--hidden-size", "0", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "MettaError" in err and err.rstrip().endswith("--hidden-size must be an integer >= 1, got 0")


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--num-envs", "two"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-envs: invalid int value: 'two'" in err and "--help" in err


def test_unwritable_output_is_found_before_any_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--save-checkpoint", str(tmp_path / "file" / "c.pt"), "--out-dir", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    assert "--save-checkpoint: the folder of" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing ran
