"""Native equivalence matrix: agreement under the mapping, and every listed divergence is real."""

from __future__ import annotations

import pytest

from bridges.conformance import native
from bridges.conformance.cases import CASES_DIR, load_case

pytest.importorskip("torchrl")


@pytest.fixture(scope="module")
def problem():
    return native.equivalence_problem(load_case(CASES_DIR / "defaults_discrete_mlp.json"))


PIECES = {line.split("|")[1].strip().strip("`") for line in native.PIECES[2:]}


def test_the_pieces_table_names_functions_of_the_core():
    from metta_core import advantage, ppo_math, recurrent

    assert {"clipped_surrogate_pg_loss", "clipped_value_loss", "entropy_loss", "compute_advantage"} <= PIECES
    modules = (ppo_math, advantage, recurrent)
    assert all(any(callable(getattr(m, p, None)) for m in modules) for p in PIECES), PIECES


def _diff(a, b, items):
    return native._diff(a, b, items)[0]


@pytest.mark.parametrize("norm_adv", [True, False])
def test_torchrl_clip_ppo_equals_metta_under_the_mapping(problem, norm_adv):
    p = problem.edit(ppo={"norm_adv": norm_adv})
    assert _diff(native.metta(p), native.torchrl(p), ("policy_loss", "value_loss", "entropy", "grads")) <= 1e-6


def test_rllib_value_loss_and_entropy_equal_metta_under_the_mapping(problem):
    pytest.importorskip("ray.rllib")
    p = problem.edit(ppo={"clip_vloss": False})
    metta, rllib = native.metta(p), native.rllib(p)
    assert _diff(metta, rllib, ("value_loss", "entropy")) <= 1e-6
    assert abs(metta["policy_loss"] - rllib["policy_loss"]) > 1e-4  # the normalization divergence


def test_unmapped_reward_index_diverges(problem):
    assert _diff(native.metta(problem), native.torchrl(problem, shift_rewards=False), ("value_loss",)) > 1e-2


def test_torchrl_clip_ppo_with_lstm_module_equals_metta_and_needs_zero_states_at_resets():
    p = native.equivalence_problem(load_case(CASES_DIR / "lstm_discrete_dones_truncations.json"))
    items = ("policy_loss", "value_loss", "entropy", "grads")
    metta = native.metta(p)
    assert _diff(metta, native.torchrl(p), items) <= 1e-6
    assert _diff(metta, native.torchrl(p, zero_reset_states=False), items) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["defaults_discrete_mlp", "continuous_mlp", "lstm_discrete_dones_truncations",
                                  "gru_shared_backbone"])
def test_matrix(name):
    rows = native.matrix(load_case(CASES_DIR / f"{name}.json"))
    assert not [r for r in rows if r.error]
    for row in rows:
        if row.equivalent:
            assert row.size <= native.EQUIVALENCE_TOLERANCE, (row.framework, row.name, row.worst)
        else:
            assert row.size > 1e-4, (row.framework, row.name, row.size)
            assert set(row.piece.split(", ")) <= PIECES, (row.name, row.piece)


@pytest.mark.parametrize("name", ["lstm_discrete_dones_truncations", "gru_shared_backbone"])
def test_rllib_stateful_pipeline_equals_metta_on_recurrent_rows(name):
    """RLlib's own PPO with a stateful module (AddStatesFromEpisodesToBatch, lookback STATE_OUT for rows
    that start inside an episode) gives Metta's value loss and entropy; max_seq_len < T does not."""
    pytest.importorskip("ray.rllib")
    rows = [r for r in native.recurrent_matrix(load_case(CASES_DIR / f"{name}.json")) if r.framework == "rllib"]
    assert not [r.error for r in rows if r.error]
    (equivalent,), (probe,) = [r for r in rows if r.equivalent], [r for r in rows if not r.equivalent]
    assert equivalent.size <= native.EQUIVALENCE_TOLERANCE
    assert probe.size > 1e-3
