"""Case files: deterministic generation, coverage of the matrix, and errors for bad files."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from bridges.conformance.cases import CASE_SPECS, CASES_DIR, CaseError, case_paths, generate, load_case, write_npz
from bridges.conformance.report import run_cases
from tests.conformance.conftest import copy_case, edit_json


def _json_numbers_close(new, old, path, *, rtol, atol):
    if isinstance(old, dict):
        assert sorted(new) == sorted(old), path
        for key in old:
            _json_numbers_close(new[key], old[key], f"{path}.{key}", rtol=rtol, atol=atol)
    elif isinstance(old, float):
        assert abs(new - old) <= atol + rtol * abs(old), (path, new, old)
    else:
        assert new == old, path


# float32 results of another CPU's BLAS kernels differ by ~1e-8 to 2e-7: far below the
# conformance tolerances (1e-6 one step, 1e-5 phase), while a change of 1e-6 fails (next test)
EXPECTED_RTOL, EXPECTED_ATOL = 1e-6, 3e-7


def test_regenerating_gives_the_stored_cases(tmp_path):
    generate(tmp_path)
    stored = sorted(p.name for p in CASES_DIR.iterdir() if p.suffix in (".json", ".npz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == stored
    for name in (n for n in stored if n.endswith(".npz")):
        new, old = np.load(tmp_path / name), np.load(CASES_DIR / name)
        assert sorted(new.files) == sorted(old.files), name
        for key in old.files:
            assert new[key].dtype == old[key].dtype and new[key].shape == old[key].shape, (name, key)
            if key.startswith(("data/", "weights/", "minibatch/idx")):  # inputs: the same bytes everywhere
                assert new[key].tobytes() == old[key].tobytes(), (name, key)
            else:
                np.testing.assert_allclose(new[key], old[key], rtol=EXPECTED_RTOL, atol=EXPECTED_ATOL, err_msg=f"{name} {key}")
    for name in (n for n in stored if n.endswith(".json")):
        new, old = (json.loads((d / name).read_text()) for d in (tmp_path, CASES_DIR))
        assert {k: v for k, v in new.items() if k != "expected"} == {k: v for k, v in old.items() if k != "expected"}, name
        _json_numbers_close(new["expected"], old["expected"], name, rtol=EXPECTED_RTOL, atol=EXPECTED_ATOL)


def test_regeneration_check_catches_a_changed_expected_value(tmp_path):
    stored = json.loads((CASES_DIR / "defaults_discrete_mlp.json").read_text())["expected"]
    changed = json.loads(json.dumps(stored))
    changed["terms"]["policy_loss"] += 1e-6
    with pytest.raises(AssertionError):
        _json_numbers_close(changed, stored, "expected", rtol=EXPECTED_RTOL, atol=EXPECTED_ATOL)
    _json_numbers_close(json.loads(json.dumps(stored)), stored, "expected", rtol=EXPECTED_RTOL, atol=EXPECTED_ATOL)


def test_every_stored_case_loads():
    cases = [load_case(p) for p in case_paths()]
    assert [c.name for c in cases] == sorted(s.name for s in CASE_SPECS)
    for case in cases:
        assert (case.expected is None) == (case.expected_error is not None)


def test_matrix_covers_the_issue_list():
    cases = {c.name: c for c in map(load_case, case_paths())}
    ppo = {n: c.config["ppo"] for n, c in cases.items()}
    trainer = {n: c.config["trainer"] for n, c in cases.items()}
    alphas = {p["prioritized_experience_replay"]["prio_alpha"] for n, p in ppo.items() if cases[n].config["trainer_epoch"]}
    assert {0.0, 0.6, 1.0} <= alphas  # with annealed beta (trainer_epoch > 0)
    assert any(p["vtrace"]["rho_clip"] < 1 and p["vtrace"]["c_clip"] < 1 for p in ppo.values())
    assert any(p["vtrace"]["rho_clip"] > 1 and p["vtrace"]["c_clip"] > 1 for p in ppo.values())
    for flag in ("clip_vloss", "norm_adv"):
        assert {p[flag] for p in ppo.values()} == {True, False}
    stop = [n for n, p in ppo.items() if p["target_kl"] is not None]
    assert stop
    for n in stop:  # the early stop happens: one minibatch evaluated without a step, the phase cut short
        counts, t = cases[n].phase_counts, trainer[n]
        assert counts["minibatches_evaluated"] == counts["optimizer_steps"] + 1
        assert counts["minibatches_evaluated"] < t["update_epochs"] * t["batch_size"] // t["minibatch_size"]
    assert {1, 2} <= {t["bptt_horizon"] for t in trainer.values()}
    assert any(t["batch_size"] == t["bptt_horizon"] for t in trainer.values())  # a single segment
    assert any(t["minibatch_size"] > t["max_minibatch_size"] for t in trainer.values())  # accumulation
    kinds = {(c.config["policy"]["action"]["kind"], bool(c.config["policy"]["hidden"]))
             for c in cases.values() if c.policy_kind == "mlp"}
    assert kinds == {("discrete", True), ("discrete", False), ("continuous", True), ("continuous", False)}
    dones = cases["dones_edges_truncations"].data["dones"]
    assert dones[:, 1].any() and dones[:, -1].any() and (dones[:, 1:] * dones[:, :-1]).any()  # starts, ends, runs
    assert any(c.data["truncateds"].any() for c in cases.values())
    assert cases["norm_adv_single_element"].expected_error == "at least 2 elements"


def test_matrix_covers_recurrent_and_multi_agent_cases():
    cases = {c.name: c for c in map(load_case, case_paths())}
    recurrent = {(c.policy_kind, c.config["policy"]["shared_core"], c.config["policy"]["action"]["kind"])
                 for c in cases.values() if c.policy_kind != "mlp"}
    assert {("lstm", False, "discrete"), ("lstm", False, "continuous"), ("gru", True, "discrete")} <= recurrent
    lstm = cases["lstm_discrete_dones_truncations"]
    assert lstm.state_keys == ("actor_lstm_h", "actor_lstm_c", "critic_lstm_h", "critic_lstm_c")
    assert cases["gru_shared_backbone"].state_keys == ("gru_h",)
    dones, truncateds = lstm.data["dones"], lstm.data["truncateds"]
    for flags in (dones, truncateds):  # at column 0, mid-row and in runs
        assert flags[:, 0].any() and flags[:, 1:-1].any() and (flags[:, 1:] * flags[:, :-1]).any()
    assert not (dones + truncateds).any(axis=1).all()  # and a row that never resets
    multi = cases["multi_agent_shared_policy"]
    assert multi.agents == 4 and multi.policy_kind == "mlp"
    segments = multi.data["values"].shape[0]
    assert segments % (2 * multi.agents) == 0  # 2 envs x 4 agents per horizon block
    for key in ("dones", "truncateds"):  # all agents of an env end together
        groups = multi.data[key].reshape(segments // multi.agents, multi.agents, -1)
        assert (groups == groups[:, :1]).all() and groups.any()


def test_last_action_case_is_sharp_about_the_stored_last_actions():
    """``lstm_last_action``: the stored last actions are not the shifted actions (a runner must read
    them), not 0 where the flags reset the state (Metta keeps them across episode ends) and every
    action value occurs; the other cases have no ``condition_on_last_action`` field at all."""
    cases = {c.name: c for c in map(load_case, case_paths())}
    case = cases["lstm_last_action"]
    assert case.conditions_on_last_action and case.policy_kind == "lstm"
    assert case.policy_keys == (*case.state_keys, "last_actions")
    last, actions = case.data["last_actions"], case.data["actions"]
    reset = (case.data["dones"] + case.data["truncateds"]) > 0
    assert reset[:, 0].any() and reset[:, 1:-1].any() and (reset[:, 1:] & reset[:, :-1]).any()
    assert (last[reset] != 0).all()
    assert (last[:, 1:] != actions[:, :-1]).mean() > 0.5
    assert set(last.ravel().tolist()) == set(range(case.config["policy"]["action"]["n"]))
    others = [json.loads(p.read_text())["policy"] for p in case_paths() if p.stem != "lstm_last_action"]
    assert not any("condition_on_last_action" in policy for policy in others)


def test_generation_is_deterministic(tmp_path):
    names = ["lstm_discrete_dones_truncations", "gru_shared_backbone", "multi_agent_shared_policy", "lstm_last_action"]
    first, second = generate(tmp_path / "a", names), generate(tmp_path / "b", names)
    for a, b in zip(first, second):
        for suffix in (".json", ".npz"):
            assert a.with_suffix(suffix).read_bytes() == b.with_suffix(suffix).read_bytes(), a.name


def _rewrite_npz(path, edit):
    with np.load(path) as archive:
        arrays = dict(archive)
    edit(arrays)
    write_npz(path, arrays)


BAD_FILES = {
    "truncated npz": (lambda p: p.with_suffix(".npz").write_bytes(p.with_suffix(".npz").read_bytes()[:700]), "npz"),
    "truncated json": (lambda p: p.write_text(p.read_text()[:500]), "json"),
    "NaN in values": (lambda p: _rewrite_npz(p.with_suffix(".npz"), lambda a: a["data/values"].__setitem__((1, 2), np.nan)),
                      "data/values"),
    "rewards shape": (lambda p: _rewrite_npz(p.with_suffix(".npz"), lambda a: a.update({"data/rewards": a["data/rewards"][:, :-1]})),
                      "data/rewards"),
    "missing weight": (lambda p: _rewrite_npz(p.with_suffix(".npz"), lambda a: a.pop("weights/critic.0.bias")),
                       "weights/critic.0.bias"),
    "manifest mismatch": (lambda p: edit_json(p, lambda d: d["arrays"]["data/env_obs"].update(shape=[8, 8, 4])),
                          "arrays.data/env_obs"),
    "unknown ppo field": (lambda p: edit_json(p, lambda d: d["ppo"].update(clip_cof=0.2)), "ppo.clip_cof"),
    "out-of-range gamma": (lambda p: edit_json(p, lambda d: d["ppo"].update(gamma=1.5)), "ppo.gamma"),
    "indivisible sizes": (lambda p: edit_json(p, lambda d: d["trainer"].update(minibatch_size=12)), "trainer"),
    "unsupported action kind": (lambda p: edit_json(p, lambda d: d["policy"]["action"].update(kind="multidiscrete")),
                                "policy.action.kind"),
    "missing expected term": (lambda p: edit_json(p, lambda d: d["expected"]["terms"].pop("clipfrac")),
                              "expected.terms.clipfrac"),
    "last action on an mlp": (lambda p: edit_json(p, lambda d: d["policy"].update(condition_on_last_action=True)),
                              "policy.condition_on_last_action"),
}


def _set_policy(**fields):
    return lambda p: edit_json(p, lambda d: d["policy"].update(fields))


RECURRENT_BAD_FILES = {
    "unknown policy kind": (_set_policy(kind="transformer"), "policy.kind"),
    "architecture of another kind": (_set_policy(architecture="actor_critic_tanh_mlp"), "policy.architecture"),
    "zero hidden_size": (_set_policy(hidden_size=0), "policy.hidden_size"),
    "fractional num_layers": (_set_policy(num_layers=1.5), "policy.num_layers"),
    "shared_core not a bool": (_set_policy(shared_core="yes"), "policy.shared_core"),
    "missing shared_core": (lambda p: edit_json(p, lambda d: d["policy"].pop("shared_core")), "policy.shared_core"),
    "mlp widths on a recurrent policy": (_set_policy(hidden=[8]), "policy.hidden"),
    "missing stored state": (lambda p: _rewrite_npz(p.with_suffix(".npz"), lambda a: a.pop("data/critic_lstm_c")),
                             "data/critic_lstm_c"),
    "stored state of another size": (
        lambda p: _rewrite_npz(p.with_suffix(".npz"), lambda a: a.update({"data/actor_lstm_h": a["data/actor_lstm_h"][..., :4]})),
        "data/actor_lstm_h"),
    "NaN in a stored state": (
        lambda p: _rewrite_npz(p.with_suffix(".npz"), lambda a: a["data/actor_lstm_c"].__setitem__((0, 0, 0, 1), np.nan)),
        "data/actor_lstm_c"),
    "num_layers not matching the arrays": (_set_policy(num_layers=2), "arrays.data/actor_lstm_h"),
}

LAST_ACTION_BAD_FILES = {
    "condition_on_last_action not a bool": (_set_policy(condition_on_last_action=1), "policy.condition_on_last_action"),
    "missing last_actions": (lambda p: _rewrite_npz(p.with_suffix(".npz"), lambda a: a.pop("data/last_actions")),
                             "data/last_actions"),
    "last_actions of another length": (
        lambda p: _rewrite_npz(p.with_suffix(".npz"),
                               lambda a: a.update({"data/last_actions": a["data/last_actions"][:, :-1]})),
        "data/last_actions"),
    "last_actions as floats": (
        lambda p: _rewrite_npz(p.with_suffix(".npz"),
                               lambda a: a.update({"data/last_actions": a["data/last_actions"].astype(np.float32)})),
        "data/last_actions"),
    "last action out of range": (
        lambda p: _rewrite_npz(p.with_suffix(".npz"), lambda a: a["data/last_actions"].__setitem__((2, 5), 3)),
        "data/last_actions"),
    # the encoders' weights then have more inputs than the settings say: not read as a plain LSTM case
    "condition_on_last_action switched off": (_set_policy(condition_on_last_action=False),
                                              "arrays.weights/trunks.0.encoder.0.weight"),
}

LAYOUT_BAD_FILES = {
    "agents not dividing the segments": (lambda p: edit_json(p, lambda d: d["layout"].update(agents=3)), "layout.agents"),
    "zero agents": (lambda p: edit_json(p, lambda d: d["layout"].update(agents=0)), "layout.agents"),
    "unknown layout field": (lambda p: edit_json(p, lambda d: d["layout"].update(envs=2)), "layout.envs"),
    "layout not an object": (lambda p: edit_json(p, lambda d: d.update(layout=4)), "layout"),
    "recurrent fields on an mlp": (_set_policy(hidden_size=8), "policy.hidden_size"),
}


@pytest.mark.parametrize("name, damage", [*(("defaults_discrete_mlp", d) for d in BAD_FILES),
                                          *(("lstm_discrete_dones_truncations", d) for d in RECURRENT_BAD_FILES),
                                          *(("lstm_last_action", d) for d in LAST_ACTION_BAD_FILES),
                                          *(("multi_agent_shared_policy", d) for d in LAYOUT_BAD_FILES)])
def test_bad_case_file_names_case_and_field(case_dir, name, damage):
    path = copy_case(name, case_dir)
    corrupt, field = {**BAD_FILES, **RECURRENT_BAD_FILES, **LAST_ACTION_BAD_FILES, **LAYOUT_BAD_FILES}[damage]
    corrupt(path)
    with pytest.raises(CaseError, match=name) as info:
        load_case(path)
    assert info.value.case == name
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)


def test_bad_files_are_errors_and_the_run_continues(case_dir):
    good = copy_case("horizon_2", case_dir)
    bad = copy_case("defaults_discrete_mlp", case_dir)
    BAD_FILES["NaN in values"][0](bad)
    results = run_cases([bad, good], ["core"])
    assert [(r.case, r.status) for r in results] == [("defaults_discrete_mlp", "ERROR"), ("horizon_2", "PASS")]
    assert "data/values" in results[0].message and "non-finite" in results[0].message


def test_garbage_npz_member_is_reported(case_dir):
    path = copy_case("horizon_2", case_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data/values.npy", b"\x93NUMPY not really")
    path.with_suffix(".npz").write_bytes(buffer.getvalue())
    with pytest.raises(CaseError) as info:
        load_case(path)
    assert info.value.field == "data/values"
