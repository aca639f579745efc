"""Slow, obvious implementations of SPEC §2-§4, written from the spec and not from metta_core.

The formulas the conformance expected values also need live once, in
``bridges.conformance.reference`` (which imports neither ``metta_core`` nor a bridge); this module
adapts them to the tests' arguments and adds the test-only references (textbook GAE, the
distributed normalization). Tests compare the fast kernels against these.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bridges.conformance import reference


def advantage_loop(values, rewards, dones, ratio, gamma, gae_lambda, rho_clip=1.0, c_clip=1.0,
                   dtype=np.float32) -> np.ndarray:
    """SPEC §2, one row and one step at a time, in float32 like the kernel (or ``dtype``); CPU or CUDA tensors."""
    values, rewards, dones, ratio = (x.cpu() if isinstance(x, torch.Tensor) else x for x in (values, rewards, dones, ratio))
    return reference.advantage(values, rewards, dones, ratio, gamma, gae_lambda, rho_clip, c_clip, dtype=dtype)


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
    """SPEC §3 single-process path, in float64."""
    return reference.normalize(torch.as_tensor(np.asarray(adv, dtype=np.float64))).numpy()


def normalize_global(shards: list[np.ndarray]) -> list[np.ndarray]:
    """SPEC §3 distributed path computed from all shards at once."""
    allv = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in shards])
    mean = allv.sum() / len(allv)
    var = (allv**2).sum() / len(allv) - mean**2
    std = math.sqrt(max(var, 1e-8))
    return [(np.asarray(s, dtype=np.float64) - mean) / (std + 1e-8) for s in shards]


def ppo_terms(cfg, old_logprob, new_logprob, entropy, new_values, values, rewards, dones, advantages, prio_weights=None):
    """SPEC §4.5-4.7 term by term with torch ops (so gradients can be compared); ``cfg`` a ``PPOConfig``."""
    return reference.loss_terms(
        cfg.model_dump(), logprob=new_logprob, old_logprob=old_logprob, entropy=entropy, new_values=new_values,
        values=values, rewards=rewards, dones=dones, first_adv=advantages, prio_weights=prio_weights,
    )


def sample_probabilities(advantages: np.ndarray, prio_alpha: float) -> np.ndarray:
    """SPEC §4.3 segment probabilities in float32, as the trainer computes them."""
    return reference.segment_probabilities(torch.as_tensor(np.asarray(advantages, dtype=np.float32)), prio_alpha).numpy()
