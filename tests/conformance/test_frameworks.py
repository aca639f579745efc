"""Every stored case through every framework: quick cases by default, the whole matrix with -m slow."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from bridges.conformance import runners
from bridges.conformance.cases import CASES_DIR, case_paths, load_case, quick_names
from bridges.conformance.report import TOLERANCES, compare, run_one
from bridges.conformance.runners import FRAMEWORKS
from metta_core import recurrent_policy

ALL = [p.stem for p in case_paths()]
QUICK = quick_names()

PENDING: dict[tuple[str, str], str] = {
    ("rllib", "lstm_last_action"): "RLlib's previous-action connector restarts per episode (bridges/rllib/README.md)",
}
"""(framework, case) pairs whose runner reports UNSUPPORTED until the framework's support lands;
remove a pair here when its runner's ``unsupported(case)`` stops naming the case."""


def _available(framework: str) -> bool:
    try:
        runners.load_runner(framework)
    except runners.BridgeUnavailable:
        return False
    return True


def _check(name: str, framework: str) -> None:
    if not _available(framework):
        pytest.skip(f"{framework}: bridge unavailable")
    if (framework, name) in PENDING:
        pytest.skip(f"{framework}: {name} not supported by this runner yet: {PENDING[framework, name]}")
    result = run_one(load_case(CASES_DIR / f"{name}.json"), framework)
    assert result.status == "PASS", result.message
    for quantity, diff in result.diffs.items():
        assert diff is None or diff <= TOLERANCES[quantity], quantity


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", QUICK)
def test_quick_case(name, framework):
    _check(name, framework)


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", sorted(set(ALL) - set(QUICK)))
def test_every_case(name, framework):
    _check(name, framework)


@pytest.mark.parametrize("framework, name", sorted(PENDING))
def test_pending_pairs_report_unsupported_not_a_crash_or_a_pass(framework, name):
    if not _available(framework):
        pytest.skip(f"{framework}: bridge unavailable")
    result = run_one(load_case(CASES_DIR / f"{name}.json"), framework)
    assert result.status == "UNSUPPORTED" and not result.passed, result.message
    assert "not supported by this runner yet" in result.message


def test_multi_agent_rows_folded_agent_major_fail():
    """The multi-agent case is sharp about the row order: agents folded into rows as
    ``agent * groups + env`` instead of ``env * agents + agent`` give other numbers."""
    case = load_case(CASES_DIR / "multi_agent_shared_policy.json")
    assert run_one(case, "core").status == "PASS"
    groups = case.data["values"].shape[0] // case.agents
    agent_major = [g * case.agents + a for a in range(case.agents) for g in range(groups)]
    case.data = {k: v[agent_major] for k, v in case.data.items()}
    result = run_one(case, "core")
    assert result.status == "FAIL" and result.diffs["terms"] > 1e-3, result.diffs


def _ignore_last_action(x, last_actions, num_actions):
    """``with_last_action`` of a policy that is given no last action: zeros where the one-hot goes."""
    return torch.cat([x, x.new_zeros(*x.shape[:-1], num_actions)], dim=-1)


def _restart_per_episode(case):
    """Last actions as a per-episode previous-action buffer gives them: 0 at every reset."""
    reset = (case.data["dones"] + case.data["truncateds"]) > 0
    case.data["last_actions"] = np.where(reset, 0, case.data["last_actions"])


def _shifted_actions(case):
    """Last actions derived from the row's own actions (``actions[t-1]``, 0 at column 0) instead of the stored field."""
    shifted = np.zeros_like(case.data["actions"])
    shifted[:, 1:] = case.data["actions"][:, :-1]
    case.data["last_actions"] = shifted


@pytest.mark.parametrize("damage", ["ignored", "zeroed", "restarted per episode", "shifted actions"])
def test_a_runner_that_mishandles_last_actions_fails(monkeypatch, damage):
    """``lstm_last_action`` is sharp about the stored last actions: a policy fed no last action (zero
    features), action 0 everywhere, 0 at every reset (RLlib's per-episode connector) or the row's
    shifted actions gets other numbers in the one-step check and the phase."""
    case = load_case(CASES_DIR / "lstm_last_action.json")
    if damage == "ignored":
        monkeypatch.setattr(recurrent_policy, "with_last_action", _ignore_last_action)
    elif damage == "zeroed":
        case.data["last_actions"] = np.zeros_like(case.data["last_actions"])
    elif damage == "restarted per episode":
        _restart_per_episode(case)
    else:
        _shifted_actions(case)
    result = run_one(case, "core")
    assert result.status == "FAIL", result.message
    assert result.diffs["terms"] > 1e-4 and result.diffs["params_after_phase"] > 1e-4, result.diffs


def test_expected_error_passes_only_when_raised():
    case = load_case(CASES_DIR / "norm_adv_single_element.json")
    result = run_one(case, "core")
    assert result.status == "PASS" and "at least 2 elements" in result.message
    case.config["ppo"]["norm_adv"] = False  # now the run succeeds, which is not what the case expects
    result = run_one(case, "core")
    assert result.status == "FAIL" and "expected an error" in result.message


def test_a_diverging_implementation_fails():
    """The checks are sharp: a small change of one setting shows up in every quantity."""
    case = load_case(CASES_DIR / "defaults_discrete_mlp.json")
    case.config["ppo"]["gamma"] = 0.97
    result = run_one(case, "core")
    assert result.status == "FAIL"
    assert all(result.diffs[q] > TOLERANCES[q] for q in ("terms", "grads", "params_after_phase")), result.diffs


def test_missing_quantity_is_a_failure():
    case = load_case(CASES_DIR / "horizon_2.json")
    got = runners.load_runner("core").run(case)
    del got.terms["clipfrac"]
    got.grads.pop("critic.0.bias")
    result = compare(case, "core", got)
    assert result.status == "FAIL"
    assert "terms: clipfrac not reported" in result.message and "grads: critic.0.bias not reported" in result.message


def test_unavailable_bridge_is_an_error_not_a_pass(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name == "bridges.conformance.runners.torchrl":
            raise ImportError("No module named 'torchrl'")
        return real(name, *args)

    monkeypatch.setattr(runners.importlib, "import_module", fake)
    result = run_one(load_case(CASES_DIR / "horizon_2.json"), "torchrl")
    assert result.status == "ERROR"
    assert result.message == "error: bridge unavailable: ImportError: No module named 'torchrl'"


@pytest.mark.skipif(not _available("rllib"), reason="rllib bridge unavailable")
def test_config_rllib_cannot_express_is_an_error():
    case = load_case(CASES_DIR / "horizon_2.json")
    case.config["optimizer"]["eps"] = 1e-8
    result = run_one(case, "rllib")
    assert result.status == "ERROR"
    assert "'horizon_2'" in result.message and "'optimizer.eps'" in result.message
