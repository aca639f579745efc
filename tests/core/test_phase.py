"""metta_core.phase: the schedule, the stats/target-KL rule and the driver, against slow references."""

import pytest
import torch

from metta_core.config import PrioritizedExperienceReplayConfig, TrainerConfig
from metta_core.errors import MettaError
from metta_core.phase import MinibatchSchedule, PhaseSizes, PhaseStats, clip_and_step, run_phase
from metta_core.ppo_math import anneal_beta, explained_variance, prioritized_sample


def reference_phase(sizes, stop_at, requires_grad=True):
    """SPEC §4.1/§4.8 written out: the call sequence of one phase, stopping at ``stop_at`` = (epoch, mb)."""
    calls = []
    for epoch in range(sizes.update_epochs):
        stop = False
        for mb in range(sizes.num_minibatches):
            if mb % sizes.accumulate_minibatches == 0:
                calls.append("zero")
            calls.append(("loss", epoch, mb))
            if (epoch, mb) == stop_at:
                stop = True
                break
            if requires_grad:
                calls.append("backward")
            if (mb + 1) % sizes.accumulate_minibatches == 0:
                calls.append("step")
            calls.append(("end", mb))
        if stop:
            return calls, epoch + 1
    return calls, sizes.update_epochs


def recorded_phase(sizes, stop_at, requires_grad=True):
    calls = []

    def minibatch(epoch, mb):
        calls.append(("loss", epoch, mb))
        return torch.zeros((), requires_grad=requires_grad), (epoch, mb) == stop_at

    epochs = run_phase(
        sizes, minibatch, zero_grad=lambda: calls.append("zero"), step=lambda: calls.append("step"),
        backward=lambda loss: calls.append("backward"), on_minibatch_end=lambda mb: calls.append(("end", mb)),
    )
    return calls, epochs


@pytest.mark.parametrize("epochs,minibatches,accumulate", [(1, 1, 1), (3, 4, 1), (2, 4, 2), (2, 5, 2), (2, 3, 4)])
@pytest.mark.parametrize("stop_at", [None, (0, 2), (1, 1), (1, 0)])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_run_phase_matches_reference_sequence(epochs, minibatches, accumulate, stop_at, requires_grad):
    sizes = PhaseSizes(update_epochs=epochs, num_minibatches=minibatches, minibatch_segments=1,
                       accumulate_minibatches=accumulate)
    assert recorded_phase(sizes, stop_at, requires_grad) == reference_phase(sizes, stop_at, requires_grad)


def test_run_phase_default_backward_and_clip_and_step_train_a_parameter():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    frozen = torch.nn.Parameter(torch.tensor([1.0]), requires_grad=False)
    opt = torch.optim.SGD([w], lr=1.0)
    sizes = PhaseSizes(update_epochs=1, num_minibatches=2, minibatch_segments=1, accumulate_minibatches=2)
    run_phase(sizes, lambda e, mb: ((w**2).sum() / 2, False), zero_grad=opt.zero_grad,
              step=clip_and_step([w, frozen], [opt], max_grad_norm=1.0))
    # two accumulated gradients w + w = (6, 8), norm 10, clipped to norm 1: (0.6, 0.8)
    assert torch.allclose(w.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))


def test_phase_sizes_of_trainer_config_and_validation():
    trainer = TrainerConfig(batch_size=256, bptt_horizon=8, minibatch_size=64, max_minibatch_size=32,
                            update_epochs=3, total_timesteps=1024)
    sizes = PhaseSizes.of(trainer)
    assert sizes == PhaseSizes(update_epochs=3, num_minibatches=8, minibatch_segments=4, accumulate_minibatches=2)
    with pytest.raises(MettaError, match="num_minibatches must be a positive int"):
        PhaseSizes(update_epochs=1, num_minibatches=0, minibatch_segments=1)


def prio(alpha=0.6, beta0=0.4):
    return PrioritizedExperienceReplayConfig(prio_alpha=alpha, prio_beta0=beta0)


def test_schedule_draws_equal_prioritized_sample_with_the_same_generator():
    a0 = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    schedule = MinibatchSchedule(minibatch_segments=3, prio=prio(), total_timesteps=1000, batch_size=60,
                                 generator=torch.Generator().manual_seed(7))
    schedule.start_epoch(a0, trainer_epoch=4)
    beta = anneal_beta(4, total_timesteps=1000, batch_size=60, prio_alpha=0.6, prio_beta0=0.4)
    assert schedule.beta == pytest.approx(beta)
    reference = torch.Generator().manual_seed(7)
    for _ in range(4):
        idx, w = schedule.draw()
        ref_idx, ref_w = prioritized_sample(a0, 3, prio_alpha=0.6, prio_beta=beta, generator=reference)
        assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w)


def test_schedule_errors_name_the_fix():
    schedule = MinibatchSchedule(minibatch_segments=2, prio=prio(), total_timesteps=10, batch_size=10)
    with pytest.raises(MettaError, match="call start_epoch"):
        schedule.draw()
    with pytest.raises(MettaError, match=r"\[segments, horizon\], got shape \(4,\)"):
        schedule.start_epoch(torch.zeros(4), 0)
    with pytest.raises(MettaError, match="minibatch_segments must be a positive int"):
        MinibatchSchedule(minibatch_segments=0, prio=prio(), total_timesteps=10, batch_size=10)


def test_stats_means_target_kl_and_state_round_trip():
    stats = PhaseStats()
    assert not stats.target_kl_reached(1, 0.1) and stats.mean("approx_kl") is None
    stats.track({"approx_kl": 0.05, "policy_loss": 1.0})
    stats.track({"approx_kl": 0.25, "policy_loss": 3.0})
    assert stats.means() == {"approx_kl": pytest.approx(0.15), "policy_loss": 2.0}
    assert stats.target_kl_reached(1, 0.1)
    assert not stats.target_kl_reached(0, 0.1)  # never at the first minibatch
    assert not stats.target_kl_reached(3, 0.2) and not stats.target_kl_reached(3, None)
    a0, values = torch.randn(4, 6), torch.randn(4, 6)
    stats.record_explained_variance(a0, values)
    assert stats.means()["explained_variance"] == pytest.approx(explained_variance(a0, values))
    other = PhaseStats()
    other.load_state_dict(stats.state_dict())
    assert other.means() == stats.means()
    stats.clear()
    assert stats.means() == {} and other.means() != {}


def test_stats_reduce_hook_gives_the_global_mean():
    """Two learners: this one tracked [0.05, 0.05]; the other (simulated by the hook) [0.3, 0.3]."""
    other_learner = torch.tensor([0.6, 2.0], dtype=torch.float64)
    stats = PhaseStats(reduce=lambda total: total + other_learner)
    stats.track({"approx_kl": 0.05})
    stats.track({"approx_kl": 0.05})
    assert stats.mean("approx_kl") == pytest.approx(0.7 / 4)
    assert stats.target_kl_reached(2, 0.1)  # the local mean 0.05 would not stop
    assert stats.means()["approx_kl"] == pytest.approx(0.05)  # logging stays local
