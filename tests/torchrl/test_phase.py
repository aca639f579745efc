"""MettaPPOPhase: the public per-batch phase equals the phase written out by hand (SPEC §4.1-4.8)."""

import pytest
import torch

from bridges.torchrl import MettaPPOLoss, MettaPPOPhase, MettaSegmentSampler
from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from tests.torchrl.helpers import make_batch, make_modules

B, T, MB, EPOCHS = 8, 6, 2, 2


def build(cfg, seed=0):
    actor, critic = make_modules()
    loss = MettaPPOLoss(actor, critic, cfg)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-2, eps=1e-12)
    sampler = MettaSegmentSampler(loss, minibatch_segments=MB, total_timesteps=10 * B * T, update_epochs=EPOCHS,
                                  generator=torch.Generator().manual_seed(seed))
    return loss, optimizer, sampler, make_batch(actor, critic, B=B, T=T)


def by_hand(cfg, accumulate):
    """The loop a TorchRL user would write from SPEC §4 with the sampler and the loss."""
    loss, optimizer, sampler, batch = build(cfg)
    for mb_idx, mb in sampler.phase(batch, epoch=1):
        stop = loss.target_kl_reached(mb_idx)
        out = loss(mb)
        if stop:
            break
        if mb_idx % accumulate == 0:
            optimizer.zero_grad()
        sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        if (mb_idx + 1) % accumulate == 0:
            torch.nn.utils.clip_grad_norm_(list(loss.parameters()), cfg.max_grad_norm)
            optimizer.step()
    return loss.stats(), [p.detach().clone() for p in loss.parameters()]


@pytest.mark.parametrize("target_kl,accumulate", [(None, 1), (None, 2), (1e-4, 1)])
def test_phase_equals_the_loop_by_hand(target_kl, accumulate):
    cfg = PPOConfig(target_kl=target_kl).update({"prioritized_experience_replay.prio_alpha": 0.6})
    expected_stats, expected_params = by_hand(cfg, accumulate)
    loss, optimizer, sampler, batch = build(cfg)
    phase = MettaPPOPhase(loss, optimizer, sampler, accumulate_minibatches=accumulate)
    stats = phase(batch, epoch=1)
    assert stats == expected_stats
    assert all(torch.equal(a, b) for a, b in zip(loss.parameters(), expected_params))
    calls = len(loss.phase_stats.values["approx_kl"])
    if target_kl is None:
        assert phase.epochs_trained == EPOCHS and calls == EPOCHS * B // MB
    else:  # the second minibatch sees the first one's approx_kl > 1e-4: evaluated, not stepped, phase over
        assert phase.epochs_trained == 1 and calls == 2


def test_phase_refuses_a_sampler_of_another_loss():
    loss, optimizer, _, _ = build(PPOConfig())
    _, _, other_sampler, _ = build(PPOConfig())
    with pytest.raises(MettaError, match="sampler was built for another loss"):
        MettaPPOPhase(loss, optimizer, other_sampler)
    with pytest.raises(MettaError, match="accumulate_minibatches must be a positive int"):
        MettaPPOPhase(loss, optimizer, MettaSegmentSampler(loss, minibatch_segments=MB, total_timesteps=100),
                      accumulate_minibatches=0)


def test_phase_outside_the_loss_schedule_trains_nothing():
    """A user calling MettaPPOPhase directly gets the schedule too (the CLI run once checked it itself)."""
    cfg = PPOConfig().update({"schedule.start_epoch": 2})
    loss, optimizer, sampler, batch = build(cfg)
    phase = MettaPPOPhase(loss, optimizer, sampler)
    before = [p.detach().clone() for p in loss.parameters()]
    generator = sampler.generator.get_state()
    assert phase(batch, epoch=1) == {} and phase.epochs_trained == 0
    assert all(torch.equal(a, b) for a, b in zip(loss.parameters(), before))
    assert torch.equal(sampler.generator.get_state(), generator)
    assert phase(batch, epoch=2) and phase.epochs_trained == EPOCHS
    assert not all(torch.equal(a, b) for a, b in zip(loss.parameters(), before))
