"""``metta-bridges conformance`` (via ``bridges.conformance.cli``): table, reports, exit status."""

from __future__ import annotations

import json

from bridges.conformance.cli import main
from tests.conformance.conftest import copy_case, edit_json


def test_passing_run_writes_reports_and_exits_0(tmp_path, capsys):
    status = main(["conformance", "--case", "horizon_2", "--case", "norm_adv_single_element", "--framework", "core",
                   "--out-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "horizon_2" in out and "PASS" in out and "2 passed, 0 failed, 0 errors of 2" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"] == {"total": 2, "PASS": 2, "FAIL": 0, "ERROR": 0, "UNSUPPORTED": 0}
    assert "| horizon_2 | core |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_failure_or_error_exits_nonzero(tmp_path, capsys):
    cases = tmp_path / "cases"
    copy_case("horizon_2", cases)
    bad = copy_case("horizon_1", cases)
    edit_json(bad, lambda d: d["expected"]["terms"].update(value_loss=d["expected"]["terms"]["value_loss"] + 1e-3))
    broken = copy_case("single_segment", cases)
    broken.with_suffix(".npz").write_bytes(b"PK\x03\x04 truncated")
    status = main(["conformance", "--all", "--cases-dir", str(cases), "--framework", "core", "--no-progress",
                   "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
                   "--heatmap", str(tmp_path / "h.png")])
    out = capsys.readouterr().out
    assert status == 1
    rows = {r["case"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rows["horizon_2"]["status"] == "PASS"
    assert rows["horizon_1"]["status"] == "FAIL" and "value_loss" in rows["horizon_1"]["message"]
    assert rows["single_segment"]["status"] == "ERROR" and "'npz'" in rows["single_segment"]["message"]
    assert "1 passed, 1 failed, 1 errors of 3" in out


def test_unsupported_case_is_reported_and_exits_nonzero(tmp_path, capsys, monkeypatch):
    from bridges.conformance.runners import torchrl as torchrl_runner, unsupported_features

    # a runner without recurrent support (the TorchRL runner has it since issue 12)
    monkeypatch.setattr(torchrl_runner, "unsupported",
                        lambda case: unsupported_features(case, recurrent=False, multi_agent=False))
    status = main(["conformance", "--case", "gru_shared_backbone", "--framework", "core", "--framework", "torchrl",
                   "--out-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 1
    assert "1 passed, 0 failed, 0 errors, 1 not supported yet of 2" in out
    assert "gru_shared_backbone / torchrl: recurrent policies (policy.kind 'gru', SPEC §6) not supported" in out
    assert "| gru_shared_backbone | torchrl | - | - | - | - | - | **UNSUPPORTED** |" in (tmp_path / "report.md").read_text()


def test_empty_case_directory_is_a_usage_error(tmp_path, capsys):
    assert main(["conformance", "--cases-dir", str(tmp_path), "--no-progress"]) == 2
    assert "no case files" in capsys.readouterr().err


def test_regenerate_writes_only_the_named_cases(tmp_path, capsys):
    cases = tmp_path / "cases"
    status = main(["conformance", "--regenerate", "--case", "horizon_2", "--cases-dir", str(cases),
                   "--framework", "core", "--out-dir", str(tmp_path / "out"), "--no-progress"])
    assert status == 0 and "1 passed, 0 failed, 0 errors of 1" in capsys.readouterr().out
    assert sorted(p.name for p in cases.iterdir()) == ["horizon_2.json", "horizon_2.npz"]
