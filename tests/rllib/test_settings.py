"""RLlib-only run settings: their CLI flags, and their refusal with another framework (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridges.cli import build_parser, main, parse_framework_settings
from bridges.rllib.settings import RLlibSettings
from metta_core.errors import MettaError
from metta_core.run import TrainArgs


def parse(argv: list[str]):
    return build_parser().parse_args(["train", *argv])


def test_rllib_flags_become_rllib_settings_not_train_args():
    ns = parse(["--framework", "rllib", "--address", "127.0.0.1:6379", "--num-learners", "2",
                "--num-env-runners", "3", "--no-restart-failed-env-runners"])
    assert parse_framework_settings(ns, "rllib") == RLlibSettings(
        address="127.0.0.1:6379", num_learners=2, num_env_runners=3, restart_failed_env_runners=False
    )
    assert not {"address", "num_learners", "num_env_runners"} & set(TrainArgs.__dataclass_fields__)


def test_defaults_and_no_settings_for_core():
    ns = parse([])
    assert parse_framework_settings(ns, "rllib") == RLlibSettings()
    assert parse_framework_settings(ns, "core") is None


@pytest.mark.parametrize("framework", ["core", "torchrl"])
def test_an_rllib_flag_with_another_framework_is_refused(framework, capsys):
    assert main(["train", "--framework", framework, "--num-env-runners", "2", "--no-progress"]) == 2
    assert "--num-env-runners: rllib setting(s), not read by --framework " + framework in capsys.readouterr().err


def test_bad_settings_are_refused():
    with pytest.raises(MettaError, match="num_learners is -1; expected 0 or more"):
        RLlibSettings(num_learners=-1)
    with pytest.raises(MettaError, match="address is empty"):
        RLlibSettings(address=" ")


def test_help_lists_rllib_settings_in_their_group_without_importing_ray():
    code = ("import sys, contextlib, io\nfrom bridges.cli import main\n"
            "out = io.StringIO()\nwith contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "    main(['train', '--help'])\n"
            "print(out.getvalue()); print('RAY' if any(m.split('.')[0] == 'ray' for m in sys.modules) else 'NORAY')")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=repo).stdout
    group = out[out.index("rllib settings:"):]
    for flag in ("--address", "--num-learners", "--num-env-runners", "--restart-failed-env-runners"):
        assert flag in group
    assert "--compare-native" in out[: out.index("rllib settings:")]
    assert out.strip().endswith("NORAY")
