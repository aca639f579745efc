"""Without the mettagrid extra, or on Python < 3.11, asking for a MettaGrid env gives one error with the fix
(these tests need no mettagrid)."""

import sys
from collections import namedtuple

import pytest

from bridges.cli import main
from metta_core.envs import make_training_env
from metta_core.errors import MettaError

BLOCKED = ("mettagrid", "mettagrid.config", "mettagrid.config.mettagrid_config")


def block_mettagrid(monkeypatch):
    for name in BLOCKED:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_missing_extra_names_the_pip_command(monkeypatch):
    block_mettagrid(monkeypatch)
    with pytest.raises(MettaError, match=r"need the mettagrid package .*pip install 'metta-bridges\[mettagrid\]'"):
        make_training_env("mettagrid:arena-8", 1, 0)


def test_missing_extra_from_the_cli_is_one_line_and_exit_code_2(monkeypatch, capsys, tmp_path):
    block_mettagrid(monkeypatch)
    assert main(["train", "--env", "mettagrid:arena-8", "--no-progress", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metta-bridges: error: MettaGrid") and "pip install 'metta-bridges[mettagrid]'" in err


def test_old_python_names_the_version_and_fix(monkeypatch):
    version = namedtuple("version_info", "major minor micro releaselevel serial")
    monkeypatch.setattr(sys, "version_info", version(3, 10, 14, "final", 0))
    with pytest.raises(MettaError, match=r"needs Python >= 3.11 .* this is 3.10; .*Python 3.11\+"):
        make_training_env("mettagrid:arena-24", 1, 0)
