"""Slow, obvious implementations of SPEC §2-§4, written from the spec and not from metta_core.

Everything here loops element by element in float64 Python/NumPy where that makes the formula
plain; tests compare the fast kernels against these.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def advantage_loop(values, rewards, dones, ratio, gamma, gae_lambda, rho_clip=1.0, c_clip=1.0) -> np.ndarray:
    """SPEC §2, one row and one step at a time, in float32 like the kernel."""
    v, r, d, w = (np.asarray(x, dtype=np.float32) for x in (values, rewards, dones, ratio))
    segments, horizon = v.shape
    out = np.zeros_like(v)
    g, lam = np.float32(gamma), np.float32(gae_lambda)
    for s in range(segments):
        last = np.float32(0.0)
        for t in range(horizon - 2, -1, -1):
            nnt = np.float32(1.0) - d[s, t + 1]
            rho = min(w[s, t], np.float32(rho_clip))
            c = min(w[s, t], np.float32(c_clip))
            delta = rho * (r[s, t + 1] + g * v[s, t + 1] * nnt - v[s, t])
            last = delta + g * lam * c * nnt * last
            out[s, t] = last
    return out


def gae_loop(values, next_rewards, next_dones, gamma, gae_lambda) -> np.ndarray:
    """Textbook GAE(λ) where step t's reward and terminal flag are ``next_rewards[t]``, ``next_dones[t]``
    and the last step of each row is not bootstrapped (its advantage is 0)."""
    v = np.asarray(values, dtype=np.float64)
    segments, horizon = v.shape
    out = np.zeros_like(v)
    for s in range(segments):
        for t in range(horizon - 1):
            total, discount = 0.0, 1.0
            for j in range(t, horizon - 1):
                alive = 1.0 - next_dones[s, j]
                td = next_rewards[s, j] + gamma * v[s, j + 1] * alive - v[s, j]
                total += discount * td
                discount *= gamma * gae_lambda * alive
            out[s, t] = total
    return out


def normalize_single(adv: np.ndarray) -> np.ndarray:
    a = np.asarray(adv, dtype=np.float64).ravel()
    mean = sum(a) / len(a)
    std = math.sqrt(sum((x - mean) ** 2 for x in a) / (len(a) - 1))
    return (np.asarray(adv, dtype=np.float64) - mean) / (std + 1e-8)


def normalize_global(shards: list[np.ndarray]) -> list[np.ndarray]:
    """SPEC §3 distributed path computed from all shards at once."""
    allv = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in shards])
    mean = allv.sum() / len(allv)
    var = (allv**2).sum() / len(allv) - mean**2
    std = math.sqrt(max(var, 1e-8))
    return [(np.asarray(s, dtype=np.float64) - mean) / (std + 1e-8) for s in shards]


def ppo_terms(cfg, old_logprob, new_logprob, entropy, new_values, values, rewards, dones, advantages, prio_weights=None):
    """SPEC §4.5-4.7 term by term with torch ops (so gradients can be compared)."""
    logratio = new_logprob - old_logprob
    ratio = torch.exp(torch.clamp(logratio, -10, 10))
    adv = torch.tensor(
        advantage_loop(values, rewards, dones, ratio.detach(), cfg.gamma, cfg.gae_lambda, cfg.vtrace.rho_clip, cfg.vtrace.c_clip)
    )
    if cfg.norm_adv:
        adv = torch.tensor(normalize_single(adv.numpy()), dtype=torch.float32)
    if prio_weights is not None:
        adv = prio_weights * adv
    policy = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
    returns = advantages + values
    if cfg.clip_vloss:
        v_clip = values + torch.clamp(new_values - values, -cfg.vf_clip_coef, cfg.vf_clip_coef)
        value = 0.5 * torch.max((new_values - returns) ** 2, (v_clip - returns) ** 2).mean()
    else:
        value = 0.5 * ((new_values - returns) ** 2).mean()
    ent = entropy.mean()
    return {
        "loss": policy - cfg.ent_coef * ent + cfg.vf_coef * value,
        "policy_loss": policy,
        "value_loss": value,
        "entropy": ent,
        "approx_kl": ((ratio - 1) - logratio).mean().detach(),
        "clipfrac": ((ratio - 1).abs() > cfg.clip_coef).float().mean(),
        "importance": ratio.mean().detach(),
        "current_logprobs": new_logprob.mean().detach(),
    }


def sample_probabilities(advantages: np.ndarray, prio_alpha: float) -> np.ndarray:
    """SPEC §4.3 segment probabilities in float32, as the trainer computes them."""
    mag = np.abs(np.asarray(advantages, dtype=np.float32)).sum(axis=1, dtype=np.float32)
    with np.errstate(all="ignore"):
        p = np.nan_to_num(mag ** np.float32(prio_alpha), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    return (p + np.float32(1e-6)) / (p.sum(dtype=np.float32) + np.float32(1e-6))
