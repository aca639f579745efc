"""The pieces of ``ppo_minibatch_loss`` (importance ratio, clipped surrogate, clipped value loss,
entropy loss, approx KL, clip fraction): each against a slow element-by-element loop and small
hand-computed values, over devices and dtypes; and the minibatch loss as their composition."""

from __future__ import annotations

import math

import pytest
import torch

from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import (
    approx_kl,
    clip_fraction,
    clipped_surrogate_pg_loss,
    clipped_value_loss,
    entropy_loss,
    importance_ratio,
    ppo_minibatch_loss,
)
from tests.core.test_ppo_math import make_minibatch
from tests.devices import FLOAT_DTYPES, get_default_devices

pytestmark = pytest.mark.parametrize("device", get_default_devices())
DTYPES = pytest.mark.parametrize("dtype", FLOAT_DTYPES)

# a float32 piece against a float64 loop: a few ulp of float32; float64 against float64: exact-ish
TOLERANCE = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


# -- slow references: one element at a time, Python floats (float64) ---------------------------

def elements(*tensors: torch.Tensor) -> list[tuple[float, ...]]:
    return list(zip(*(t.detach().cpu().double().flatten().tolist() for t in tensors)))


def ratio_loop(new_logprob, old_logprob):
    return [math.exp(min(max(n - o, -10.0), 10.0)) for n, o in elements(new_logprob, old_logprob)]


def surrogate_loop(ratio, adv, clip):
    terms = [max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)) for r, a in elements(ratio, adv)]
    return sum(terms) / len(terms)


def value_loss_loop(new_v, v, returns, clip, clip_vloss):
    terms = []
    for nv, old, ret in elements(new_v, v, returns):
        unclipped = (nv - ret) ** 2
        clipped = (old + min(max(nv - old, -clip), clip) - ret) ** 2
        terms.append(max(unclipped, clipped) if clip_vloss else unclipped)
    return 0.5 * sum(terms) / len(terms)


def kl_loop(new_logprob, old_logprob, ratio):
    terms = [(r - 1) - (n - o) for n, o, r in elements(new_logprob, old_logprob, ratio)]
    return sum(terms) / len(terms)


def random(shape, device, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def close(got: torch.Tensor, expected, dtype):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(got.detach().cpu().double(), expected, **TOLERANCE[dtype])


# -- importance_ratio ---------------------------------------------------------------------------

@DTYPES
def test_importance_ratio_matches_loop(device, dtype):
    old = random((5, 9), device, dtype, 0)
    new = old + random((5, 9), device, dtype, 1, scale=4.0)
    new[0, 0], new[1, 1] = old[0, 0] + 25.0, old[1, 1] - 25.0  # beyond the clamp both ways
    ratio = importance_ratio(new, old)
    assert ratio.dtype == dtype and ratio.device.type == device.type
    close(ratio, torch.tensor(ratio_loop(new, old), dtype=torch.float64).reshape(5, 9), dtype)
    close(ratio[0, 0], math.exp(10.0), dtype)
    close(ratio[1, 1], math.exp(-10.0), dtype)


@DTYPES
def test_importance_ratio_gradient_stops_at_the_clamp(device, dtype):
    old = torch.zeros(3, device=device, dtype=dtype)
    new = torch.tensor([0.5, 12.0, -12.0], device=device, dtype=dtype, requires_grad=True)
    importance_ratio(new, old).sum().backward()
    close(new.grad, [math.exp(0.5), 0.0, 0.0], dtype)


# -- clipped_surrogate_pg_loss ------------------------------------------------------------------

@DTYPES
def test_clipped_surrogate_matches_loop(device, dtype):
    ratio = random((6, 7), device, dtype, 2, scale=0.4, shift=1.0).abs()
    adv = random((6, 7), device, dtype, 3, scale=2.0)
    for clip in (0.1, 0.264407, 1.0):
        close(clipped_surrogate_pg_loss(ratio, adv, clip_coef=clip), surrogate_loop(ratio, adv, clip), dtype)


@DTYPES
def test_clipped_surrogate_hand_computed(device, dtype):
    ratio = torch.tensor([0.5, 1.0, 2.0, 0.5], device=device, dtype=dtype)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], device=device, dtype=dtype)
    # max(-0.5, -0.8) = -0.5; max(1, 1) = 1; max(-2, -1.2) = -1.2; max(0.5, 0.8) = 0.8
    close(clipped_surrogate_pg_loss(ratio, adv, clip_coef=0.2), (-0.5 + 1.0 - 1.2 + 0.8) / 4, dtype)


@DTYPES
def test_clipped_surrogate_gradient_is_zero_where_the_clip_binds(device, dtype):
    ratio = torch.tensor([2.0, 2.0, 0.5, 1.1], device=device, dtype=dtype, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], device=device, dtype=dtype)
    clipped_surrogate_pg_loss(ratio, adv, clip_coef=0.2).backward()
    # binds (pessimistic side clipped): A > 0 with ratio > 1.2 and A < 0 with ratio < 0.8
    close(ratio.grad, [0.0, 0.25, 0.0, -0.25], dtype)


@DTYPES
def test_clipped_surrogate_without_clip_is_the_plain_surrogate(device, dtype):
    ratio = random((4, 5), device, dtype, 4, scale=0.5, shift=1.0).abs()
    adv = random((4, 5), device, dtype, 5)
    close(clipped_surrogate_pg_loss(ratio, adv, clip_coef=1e9), (-adv * ratio).mean(), dtype)


# -- clipped_value_loss -------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("clip_vloss", [True, False])
def test_clipped_value_loss_matches_loop(device, dtype, clip_vloss):
    v = random((5, 8), device, dtype, 6)
    new_v = v + random((5, 8), device, dtype, 7, scale=0.3)
    returns = v + random((5, 8), device, dtype, 8)
    for clip in (0.05, 0.1, 10.0):
        got = clipped_value_loss(new_v, v, returns, vf_clip_coef=clip, clip_vloss=clip_vloss)
        close(got, value_loss_loop(new_v, v, returns, clip, clip_vloss), dtype)


@DTYPES
def test_clipped_value_loss_hand_computed(device, dtype):
    new_v = torch.tensor([1.0, 0.0], device=device, dtype=dtype)
    v = torch.tensor([0.5, 0.5], device=device, dtype=dtype)
    returns = torch.tensor([2.0, 0.0], device=device, dtype=dtype)
    # unclipped (1-2)^2 = 1, 0; clipped values 0.6, 0.4 -> 1.96, 0.16; 0.5 * mean(max) = 0.5 * 1.06
    close(clipped_value_loss(new_v, v, returns, vf_clip_coef=0.1), 0.53, dtype)
    close(clipped_value_loss(new_v, v, returns, vf_clip_coef=0.1, clip_vloss=False), 0.25, dtype)


@DTYPES
def test_clipped_value_loss_with_a_wide_clip_is_half_the_squared_error(device, dtype):
    v = random((3, 4), device, dtype, 9)
    new_v, returns = v + random((3, 4), device, dtype, 10), v + random((3, 4), device, dtype, 11)
    wide = clipped_value_loss(new_v, v, returns, vf_clip_coef=1e9)  # v + (new_v - v) is new_v up to rounding
    close(wide, clipped_value_loss(new_v, v, returns, vf_clip_coef=0.1, clip_vloss=False), dtype)


# -- entropy_loss, approx_kl, clip_fraction ----------------------------------------------------

@DTYPES
def test_entropy_loss_is_minus_the_mean(device, dtype):
    entropy = random((4, 6), device, dtype, 12).abs().requires_grad_()
    loss = entropy_loss(entropy)
    values = [e for (e,) in elements(entropy)]
    close(loss, -sum(values) / len(values), dtype)
    loss.backward()
    close(entropy.grad, torch.full((4, 6), -1 / 24, dtype=torch.float64), dtype)


@DTYPES
def test_approx_kl_matches_loop_and_has_no_grad(device, dtype):
    old = random((4, 6), device, dtype, 13)
    new = (old + random((4, 6), device, dtype, 14, scale=0.5)).requires_grad_()
    with torch.no_grad():
        new[0, 0] = old[0, 0] + 30.0  # the clamped ratio, the unclamped log-ratio
    ratio = importance_ratio(new, old)
    kl = approx_kl(new, old, ratio)
    assert not kl.requires_grad
    close(kl, kl_loop(new, old, ratio), dtype)


@DTYPES
def test_clip_fraction_hand_computed(device, dtype):
    ratio = torch.tensor([[0.7, 0.85, 1.0], [1.15, 1.3, 2.0]], device=device, dtype=dtype, requires_grad=True)
    fraction = clip_fraction(ratio, clip_coef=0.2)
    assert not fraction.requires_grad and fraction.dtype == torch.float32  # a count, as Metta's .float()
    close(fraction, 3 / 6, torch.float32)


@DTYPES
def test_pieces_average_with_the_given_mean(device, dtype):
    ratio = random((4, 5), device, dtype, 15, scale=0.3, shift=1.0).abs()
    adv = random((4, 5), device, dtype, 16)
    mask = torch.zeros(4, 5, dtype=torch.bool, device=device)
    mask[:2, 1:] = True

    def masked_mean(x):
        return x[mask].mean()

    got = clipped_surrogate_pg_loss(ratio, adv, clip_coef=0.2, mean=masked_mean)
    assert torch.equal(got, clipped_surrogate_pg_loss(ratio[mask], adv[mask], clip_coef=0.2))
    assert torch.equal(entropy_loss(adv, mean=masked_mean), entropy_loss(adv[mask]))


@DTYPES
@pytest.mark.parametrize("call, match", [
    (lambda x, y: importance_ratio(x, y), r"importance_ratio: old_logprob_t has shape \(2, 3\) but new_logprob_t has \(2, 4\)"),
    (lambda x, y: clipped_surrogate_pg_loss(x, y, clip_coef=0.2), r"clipped_surrogate_pg_loss: adv_t has shape \(2, 3\)"),
    (lambda x, y: clipped_value_loss(x, x, y, vf_clip_coef=0.1), r"clipped_value_loss: returns_t has shape \(2, 3\)"),
    (lambda x, y: approx_kl(x, x, y), r"approx_kl: ratio_t has shape \(2, 3\) but new_logprob_t has \(2, 4\)"),
])
def test_shape_mismatch_names_both_shapes(device, dtype, call, match):
    with pytest.raises(MettaError, match=match):
        call(torch.zeros(2, 4, device=device, dtype=dtype), torch.zeros(2, 3, device=device, dtype=dtype))


# -- the composition ----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [PPOConfig(), PPOConfig(clip_vloss=False, norm_adv=False, ent_coef=0.3)],
                         ids=["defaults", "no_clip_vloss_no_norm"])
def test_minibatch_loss_is_the_sum_of_its_pieces_bit_for_bit(device, cfg):
    # float32 only: ppo_minibatch_loss runs the float32 advantage kernel (SPEC: float32)
    data, params = make_minibatch(seed=21, spread=1.0)
    data = {k: v.to(device) for k, v in data.items()}
    params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
    terms = ppo_minibatch_loss(cfg, **data, **params)
    ratio = importance_ratio(params["new_logprob"], data["old_logprob"])
    assert torch.equal(terms.ratio, ratio)
    assert torch.equal(terms.policy_loss, clipped_surrogate_pg_loss(ratio, terms.advantages, clip_coef=cfg.clip_coef))
    assert torch.equal(terms.value_loss, clipped_value_loss(params["new_values"], data["values"], terms.returns,
                                                            vf_clip_coef=cfg.vf_clip_coef, clip_vloss=cfg.clip_vloss))
    assert torch.equal(terms.entropy, -entropy_loss(params["entropy"]))
    assert torch.equal(terms.approx_kl, approx_kl(params["new_logprob"], data["old_logprob"], ratio))
    assert torch.equal(terms.clipfrac, clip_fraction(ratio, clip_coef=cfg.clip_coef))
    pieces = (terms.policy_loss + cfg.ent_coef * entropy_loss(params["entropy"])
              + cfg.vf_coef * terms.value_loss)
    assert torch.equal(terms.loss, pieces)
