"""MettaSegmentSampler: rows, weights and beta as SPEC §4.2-4.3 (through the core), reproducibility."""

import pytest
import torch

from bridges.torchrl import MettaPPOLoss, MettaSegmentSampler
from metta_core.advantage import compute_advantage
from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import anneal_beta, explained_variance
from tests.reference import sample_probabilities
from tests.torchrl.helpers import make_batch, make_modules, metta_layout

B, T, MB = 8, 6, 2


def setup(cfg=None, seed=0, update_epochs=1):
    actor, critic = make_modules()
    loss = MettaPPOLoss(actor, critic, cfg)
    batch = make_batch(actor, critic, B=B, T=T)
    sampler = MettaSegmentSampler(loss, minibatch_segments=MB, total_timesteps=10 * B * T,
                                  update_epochs=update_epochs, generator=torch.Generator().manual_seed(seed))
    return loss, batch, sampler


def first_pass(batch, cfg):
    values, rewards, dones = metta_layout(batch)
    return compute_advantage(values, rewards, dones, torch.ones_like(values), gamma=cfg.gamma, gae_lambda=cfg.gae_lambda)


def test_minibatches_are_whole_rows_with_spec_weights():
    cfg = PPOConfig().update({"prioritized_experience_replay.prio_alpha": 0.7})
    loss, batch, sampler = setup(cfg)
    epoch = 3
    a0 = first_pass(batch, cfg)
    probs = torch.tensor(sample_probabilities(a0.numpy(), 0.7))
    beta = anneal_beta(epoch, total_timesteps=10 * B * T, batch_size=B * T, prio_alpha=0.7, prio_beta0=0.6)
    replay = torch.Generator().manual_seed(0)
    minibatches = list(sampler.phase(batch, epoch=epoch))
    assert [i for i, _ in minibatches] == list(range(B // MB))
    assert float(loss.anneal_beta) == pytest.approx(beta) and beta > 0.6
    for _, mb in minibatches:
        idx = torch.multinomial(probs, MB, replacement=False, generator=replay)
        assert mb.batch_size == (MB, T)
        assert torch.equal(mb["observation"], batch["observation"][idx])
        assert torch.equal(mb["advantage"][..., 0], a0[idx])
        expected_w = (B * probs[idx, None]) ** -beta
        assert torch.allclose(mb["priority_weight"], expected_w.expand(MB, T), rtol=1e-5)


def test_same_seed_same_draws_and_state_dict_continues():
    _, batch, first = setup(seed=11)
    _, _, second = setup(seed=11)
    draws_a = [mb["observation"] for _, mb in first.phase(batch, epoch=0)]
    draws_b = [mb["observation"] for _, mb in second.phase(batch, epoch=0)]
    assert all(torch.equal(a, b) for a, b in zip(draws_a, draws_b))
    state = first.state_dict()
    _, _, resumed = setup(seed=99)
    resumed.load_state_dict(state)
    nxt = [mb["observation"] for _, mb in first.phase(batch, epoch=1)]
    again = [mb["observation"] for _, mb in resumed.phase(batch, epoch=1)]
    assert all(torch.equal(a, b) for a, b in zip(nxt, again))


def test_phase_clears_tracker_and_records_explained_variance():
    cfg = PPOConfig()
    loss, batch, sampler = setup(cfg, update_epochs=2)
    loss(batch)
    count = 0
    for _, mb in sampler.phase(batch, epoch=0):
        loss(mb)
        count += 1
    assert count == 2 * (B // MB)
    values, _, _ = metta_layout(batch)
    stats = loss.stats()
    assert stats["explained_variance"] == pytest.approx(explained_variance(first_pass(batch, cfg), values))
    assert len(loss.phase_stats.values["policy_loss"]) == count  # the call before the phase was cleared


def test_rows_must_divide():
    loss, batch, _ = setup()
    sampler = MettaSegmentSampler(loss, minibatch_segments=3, total_timesteps=100)
    with pytest.raises(MettaError, match=r"8 rows.*minibatch_segments \(3\)"):
        next(sampler.phase(batch, epoch=0))
    with pytest.raises(MettaError, match="minibatch_segments must be a positive int"):
        MettaSegmentSampler(loss, minibatch_segments=0, total_timesteps=100)
