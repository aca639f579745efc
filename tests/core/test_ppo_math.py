"""ppo_minibatch_loss, prioritized_sample and anneal_beta against the SPEC reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import PPOTerms, anneal_beta, ppo_minibatch_loss, prioritized_sample
from tests.devices import FLOAT_DTYPES, get_default_devices
from tests.reference import advantage_loop, ppo_terms, sample_probabilities


def make_minibatch(seed, mb=4, horizon=8, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    shape = (mb, horizon)
    values = torch.randn(shape, generator=g)
    rewards = torch.randn(shape, generator=g)
    dones = (torch.rand(shape, generator=g) < 0.15).float()
    old_logprob = -torch.rand(shape, generator=g) * 2
    params = {
        "new_logprob": (old_logprob + torch.randn(shape, generator=g) * spread).requires_grad_(),
        "entropy": torch.rand(shape, generator=g).requires_grad_(),
        "new_values": (values + torch.randn(shape, generator=g) * 0.3).requires_grad_(),
    }
    advantages = torch.tensor(advantage_loop(values, rewards, dones, torch.ones(shape), 0.977, 0.891477))
    return dict(old_logprob=old_logprob, values=values, rewards=rewards, dones=dones, advantages=advantages), params


CONFIGS = {
    "defaults": PPOConfig(),
    "no_clip_vloss_no_norm": PPOConfig(clip_vloss=False, norm_adv=False),
    "vtrace_low": PPOConfig().update({"vtrace.rho_clip": 0.5, "vtrace.c_clip": 0.7}),
    "vtrace_high": PPOConfig().update({"vtrace.rho_clip": 3.0, "vtrace.c_clip": 2.0, "clip_coef": 0.1}),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("with_prio", [False, True])
def test_terms_and_gradients_match_reference(name, with_prio):
    cfg = CONFIGS[name]
    data, params = make_minibatch(seed=len(name), spread=1.0)
    prio = torch.rand(4, 1, generator=torch.Generator().manual_seed(9)) + 0.5 if with_prio else None
    terms = ppo_minibatch_loss(cfg, **data, **params, prio_weights=prio)
    terms.loss.backward()
    grads = {k: v.grad.clone() for k, v in params.items()}
    for v in params.values():
        v.grad = None
    expected = ppo_terms(cfg, **data, **params, prio_weights=prio)
    expected["loss"].backward()
    for key, value in expected.items():
        torch.testing.assert_close(getattr(terms, key), value.detach(), atol=1e-6, rtol=1e-6, msg=key)
    for key, value in params.items():
        torch.testing.assert_close(grads[key], value.grad, atol=1e-6, rtol=1e-6, msg=f"grad {key}")


def test_loss_is_sum_of_terms_and_stats_are_floats():
    cfg = PPOConfig()
    data, params = make_minibatch(seed=3)
    terms = ppo_minibatch_loss(cfg, **data, **params)
    recomposed = terms.policy_loss - cfg.ent_coef * terms.entropy + cfg.vf_coef * terms.value_loss
    torch.testing.assert_close(terms.loss, recomposed)
    assert set(terms.stats()) == set(PPOTerms.STATS) and all(isinstance(v, float) for v in terms.stats().values())
    assert terms.loss.requires_grad and not terms.approx_kl.requires_grad and not terms.advantages.requires_grad


def test_log_ratio_is_clamped_but_approx_kl_is_not():
    cfg = PPOConfig(norm_adv=False)
    data, params = make_minibatch(seed=4)
    with torch.no_grad():
        params["new_logprob"][0, 0] = data["old_logprob"][0, 0] + 30.0
    terms = ppo_minibatch_loss(cfg, **data, **params)
    assert torch.isclose(terms.ratio[0, 0], torch.exp(torch.tensor(10.0)))
    expected = ppo_terms(cfg, **data, **params)["approx_kl"]
    torch.testing.assert_close(terms.approx_kl, expected)  # (e^10 - 1) - 30 enters the mean


def test_mask_equals_loss_over_valid_rows():
    cfg = PPOConfig()
    data, params = make_minibatch(seed=5, mb=6)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[:4] = True
    masked = ppo_minibatch_loss(cfg, **data, **params, mask=mask)
    sliced = ppo_minibatch_loss(cfg, **{k: v[:4] for k, v in data.items()}, **{k: v[:4] for k, v in params.items()})
    for key in PPOTerms.STATS + ("loss",):
        torch.testing.assert_close(getattr(masked, key), getattr(sliced, key), msg=key)


@pytest.mark.parametrize("key", ["rewards", "values", "old_logprob", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_named(key, bad):
    data, params = make_minibatch(seed=6)
    data[key] = data[key].clone()
    data[key][1, 2] = bad
    with pytest.raises(MettaError, match=f"non-finite values .* in {key}"):
        ppo_minibatch_loss(PPOConfig(), **data, **params)


def test_shape_mismatch_is_named():
    data, params = make_minibatch(seed=7)
    data["rewards"] = data["rewards"][:, :-1]
    with pytest.raises(MettaError, match=r"rewards has shape \(4, 7\), expected \(4, 8\)"):
        ppo_minibatch_loss(PPOConfig(), **data, **params)
    data, params = make_minibatch(seed=7)
    with pytest.raises(MettaError, match=r"prio_weights has shape \(3, 1\)"):
        ppo_minibatch_loss(PPOConfig(), **data, **params, prio_weights=torch.ones(3, 1))


def test_anneal_beta():
    def beta(epoch, total, batch, alpha, beta0):
        return anneal_beta(epoch, total_timesteps=total, batch_size=batch, prio_alpha=alpha, prio_beta0=beta0)

    assert beta(0, 1000, 100, 0.6, 0.4) == pytest.approx(0.4)
    assert beta(5, 1000, 100, 0.6, 0.4) == pytest.approx(0.4 + 0.6 * 0.6 * 5 / 10)
    assert beta(3, 50, 100, 1.0, 0.6) == pytest.approx(0.6 + 0.4 * 3 / 1)  # max(1, 50 // 100)
    assert beta(7, 1000, 100, 0.0, 0.6) == 0.6
    with pytest.raises(TypeError):
        anneal_beta(0, 1000, 100, 0.6, 0.4)  # keyword-only after epoch


@settings(max_examples=60, deadline=None)
@given(
    segments=st.integers(1, 12),
    alpha=st.sampled_from([0.0, 0.6, 1.0]),
    beta=st.sampled_from([0.0, 0.6, 1.0]),
    zero_rows=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_prioritized_sample_matches_reference(segments, alpha, beta, zero_rows, seed):
    adv = torch.randn(segments, 5, generator=torch.Generator().manual_seed(seed))
    if zero_rows:
        adv[: segments // 2] = 0.0
    k = max(1, segments // 2)
    idx, w = prioritized_sample(adv, k, prio_alpha=alpha, prio_beta=beta, generator=torch.Generator().manual_seed(seed))
    probs = sample_probabilities(adv.numpy(), alpha)
    expected_idx = torch.multinomial(torch.tensor(probs), k, replacement=False, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(idx, expected_idx)
    assert len(set(idx.tolist())) == k and w.shape == (k, 1)
    np.testing.assert_allclose(w.numpy()[:, 0], (segments * probs[idx.numpy()]) ** -beta, rtol=1e-6)


@pytest.mark.parametrize("device", get_default_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_prioritized_sample_on_device_weights_the_drawn_rows(device, dtype):
    adv = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    idx, w = prioritized_sample(adv.to(device), 6, prio_alpha=0.6, prio_beta=0.4,
                                generator=torch.Generator(device=device).manual_seed(0))
    assert idx.device.type == device.type and w.device.type == device.type
    assert w.dtype == torch.float32  # the SPEC samples in float32 whatever the advantages' dtype
    idx = idx.cpu().numpy()
    assert len(set(idx.tolist())) == 6
    probs = sample_probabilities(adv.float().numpy(), 0.6)
    np.testing.assert_allclose(w.cpu().numpy()[:, 0], (12 * probs[idx]) ** -0.4, rtol=1e-6)


def test_prioritized_sample_uses_global_rng_like_multinomial():
    adv = torch.randn(10, 4)
    torch.manual_seed(123)
    idx, _ = prioritized_sample(adv, 3, prio_alpha=0.6, prio_beta=0.5)
    torch.manual_seed(123)
    expected = torch.multinomial(torch.tensor(sample_probabilities(adv.numpy(), 0.6)), 3, replacement=False)
    assert torch.equal(idx, expected)


def test_prioritized_sample_prefers_large_advantages():
    adv = torch.zeros(50, 4)
    adv[7] = 100.0
    hits = sum(
        int(7 in prioritized_sample(adv, 1, prio_alpha=1.0, prio_beta=0.6, generator=torch.Generator().manual_seed(s))[0])
        for s in range(40)
    )
    assert hits >= 39


def test_prioritized_sample_bad_count():
    with pytest.raises(MettaError, match=r"num_segments \(5\) must be in 1..segments \(4\)"):
        prioritized_sample(torch.zeros(4, 3), 5, prio_alpha=0.0, prio_beta=0.6)


def test_empty_mask_gives_a_graph_connected_zero():
    data, params = make_minibatch(seed=8)
    terms = ppo_minibatch_loss(PPOConfig(norm_adv=False), **data, **params, mask=torch.zeros(4, 8, dtype=torch.bool))
    assert terms.count == 0 and terms.loss.item() == 0.0 and terms.loss.requires_grad
    assert all(v == 0.0 for v in terms.stats().values())
    terms.loss.backward()
    assert all(torch.all(p.grad == 0) for p in params.values())


def test_weighted_terms_sum_to_loss_bit_for_bit():
    cfg = PPOConfig()
    data, params = make_minibatch(seed=9)
    terms = ppo_minibatch_loss(cfg, **data, **params)
    assert torch.equal(terms.entropy_term, -cfg.ent_coef * terms.entropy)
    assert torch.equal(terms.value_term, cfg.vf_coef * terms.value_loss)
    assert torch.equal(terms.loss, terms.policy_loss - cfg.ent_coef * terms.entropy + cfg.vf_coef * terms.value_loss)
