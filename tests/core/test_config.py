"""Configs: Metta's defaults, validation ranges, dotted overrides, buffer arithmetic errors."""

import pytest
from pydantic import ValidationError

from metta_core.config import LossSchedule, PPOConfig, TrainerConfig, buffer_sizes
from metta_core.errors import MettaError


def test_defaults_are_mettas():
    cfg = PPOConfig()
    assert (cfg.clip_coef, cfg.ent_coef, cfg.gae_lambda, cfg.gamma) == (0.264407, 0.01, 0.891477, 0.977)
    assert (cfg.max_grad_norm, cfg.vf_clip_coef, cfg.vf_coef) == (0.5, 0.1, 0.897619)
    assert (cfg.l2_reg_loss_coef, cfg.l2_init_loss_coef) == (0.0, 0.0)
    assert cfg.norm_adv and cfg.clip_vloss and cfg.target_kl is None
    assert (cfg.vtrace.rho_clip, cfg.vtrace.c_clip) == (1.0, 1.0)
    prio = cfg.prioritized_experience_replay
    assert (prio.prio_alpha, prio.prio_beta0) == (0.0, 0.6)


def test_unknown_field_is_named():
    with pytest.raises(ValidationError, match="clip_cof"):
        PPOConfig(clip_cof=0.2)


@pytest.mark.parametrize(
    "field, value",
    [("clip_coef", 0.0), ("clip_coef", 1.5), ("gamma", 1.01), ("gae_lambda", -0.1), ("ent_coef", -1.0),
     ("vf_coef", -0.1), ("max_grad_norm", -1.0)],
)
def test_ranges(field, value):
    with pytest.raises(ValidationError, match=field):
        PPOConfig(**{field: value})


@pytest.mark.parametrize("path, value", [("vtrace.rho_clip", 0.0), ("vtrace.c_clip", -1.0),
                                         ("prioritized_experience_replay.prio_alpha", 1.2)])
def test_nested_ranges_through_override(path, value):
    with pytest.raises(ValidationError, match=path.split(".")[-1]):
        PPOConfig().override(path, value)


def test_override_and_update():
    cfg = PPOConfig().override("vtrace.rho_clip", 0.8).update({"gamma": 0.99, "prioritized_experience_replay.prio_alpha": 0.6})
    assert cfg.vtrace.rho_clip == 0.8 and cfg.gamma == 0.99 and cfg.prioritized_experience_replay.prio_alpha == 0.6


@pytest.mark.parametrize("path, match", [("vtrace.rho_clp", "no field 'rho_clp'"), ("vtrce.rho_clip", "'vtrce' is not a nested config"),
                                         ("gamma.x", "'gamma' is not a nested config")])
def test_override_unknown_path(path, match):
    with pytest.raises(MettaError, match=match):
        PPOConfig().override(path, 1.0)


def test_buffer_sizes_follow_metta():
    sizes = buffer_sizes(batch_size=4096, bptt_horizon=64, minibatch_size=2048, max_minibatch_size=1024)
    # the cap applies to the minibatch, accumulation uses the requested size
    assert sizes == {"segments": 64, "minibatch_size": 1024, "accumulate_minibatches": 2,
                     "minibatch_segments": 16, "num_minibatches": 4}


def test_buffer_sizes_errors_are_metta_errors_naming_the_fix():
    with pytest.raises(MettaError, match=r"minibatch_size \(100\) must be divisible by bptt_horizon \(64\).*"
                                         r"use a minibatch_size that is a multiple of 64"):
        buffer_sizes(batch_size=4096, bptt_horizon=64, minibatch_size=100, max_minibatch_size=4096)


def test_minibatch_not_multiple_of_horizon():
    with pytest.raises(ValidationError, match=r"minibatch_size \(100\) must be divisible by bptt_horizon \(64\)"):
        TrainerConfig(batch_size=4096, bptt_horizon=64, minibatch_size=100)


def test_segments_not_multiple_of_minibatch_segments():
    with pytest.raises(ValidationError, match=r"num_minibatches = 2.5 is not whole"):
        TrainerConfig(batch_size=64 * 5, bptt_horizon=64, minibatch_size=128)


def test_schedule():
    s = LossSchedule(start_epoch=2, end_epoch=10, cycle_length=3, active_in_cycle=[1, 3])
    # (epoch % 3) + 1: epoch 2 -> 3, 3 -> 1, 4 -> 2 (inactive), ... ; 10 and 11 are past end_epoch
    assert [e for e in range(12) if s.is_active(e)] == [2, 3, 5, 6, 8, 9]
    with pytest.raises(ValidationError, match="outside 1..cycle_length"):
        LossSchedule(cycle_length=2, active_in_cycle=[3])
    with pytest.raises(ValidationError, match="set together"):
        LossSchedule(cycle_length=2)


def test_update_validates_the_overrides_together_and_leaves_the_config_unchanged_on_error():
    cfg = PPOConfig().update({"schedule.cycle_length": 3, "schedule.active_in_cycle": [1, 3], "gamma": 0.9})
    assert (cfg.schedule.cycle_length, cfg.schedule.active_in_cycle, cfg.gamma) == (3, [1, 3], 0.9)
    with pytest.raises(ValidationError, match="cycle_length and active_in_cycle must be set together"):
        cfg.update({"gamma": 0.5, "schedule.active_in_cycle": None})
    assert (cfg.gamma, cfg.schedule.active_in_cycle) == (0.9, [1, 3])
