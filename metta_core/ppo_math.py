"""The PPO math of one Metta training phase as pure tensor functions (SPEC §4.2-4.7).

Every bridge calls these; nothing else in the project computes the PPO formulas.
Minibatch tensors are ``[mb, horizon]`` rows in Metta's layout (SPEC §1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from metta_core.advantage import compute_advantage, normalize_advantage
from metta_core.config import PPOConfig
from metta_core.errors import MettaError

LOG_RATIO_CLAMP = 10.0
"""``ratio = exp(clamp(new_logprob - old_logprob, -10, 10))`` (SPEC §4.5)."""

PRIORITY_EPS = 1e-6
"""Added to the priorities and to their sum before normalizing (SPEC §4.3)."""


def anneal_beta(epoch: int, *, total_timesteps: int, batch_size: int, prio_alpha: float, prio_beta0: float) -> float:
    """Importance-weight exponent at trainer epoch ``epoch`` (SPEC §4.2)::

        beta = prio_beta0 + (1 - prio_beta0) * prio_alpha * epoch / max(1, total_timesteps // batch_size)
    """
    total_epochs = max(1, total_timesteps // batch_size)
    return prio_beta0 + (1.0 - prio_beta0) * prio_alpha * epoch / total_epochs


def prioritized_sample(
    advantages: Tensor,
    num_segments: int,
    *,
    prio_alpha: float,
    prio_beta: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``num_segments`` whole rows by advantage magnitude (SPEC §4.3), without replacement.

    ``advantages`` is the first-pass ``[segments, horizon]`` advantage ``A0``::

        mag = |A0|.sum(dim=1);  p = nan_to_num(mag ** prio_alpha, 0, 0, 0)
        p = (p + 1e-6) / (p.sum() + 1e-6);  idx = multinomial(p, num_segments)
        prio_w = (segments * p[idx, None]) ** -prio_beta          # [num_segments, 1]

    With ``generator`` the draw is reproducible; without it the global RNG is used exactly as
    ``torch.multinomial`` uses it. Returns ``(idx, prio_w)``.
    """
    if advantages.dim() != 2:
        raise MettaError(f"prioritized_sample: advantages must be [segments, horizon], got {tuple(advantages.shape)}")
    segments = advantages.shape[0]
    if not 1 <= num_segments <= segments:
        raise MettaError(
            f"prioritized_sample: num_segments ({num_segments}) must be in 1..segments ({segments})"
        )
    magnitude = advantages.detach().abs().sum(dim=1).to(torch.float32)
    priorities = torch.nan_to_num(magnitude**prio_alpha, 0, 0, 0)
    probs = (priorities + PRIORITY_EPS) / (priorities.sum() + PRIORITY_EPS)
    idx = torch.multinomial(probs, num_segments, replacement=False, generator=generator)
    prio_weights = (segments * probs[idx, None]) ** -prio_beta
    return idx, prio_weights


@dataclass(frozen=True)
class PPOTerms:
    """What one minibatch of Metta PPO computes (SPEC §4.5-4.7); all tensors.

    ``loss = policy_loss + entropy_term + value_term`` is differentiable, with
    ``entropy_term = -ent_coef * entropy`` and ``value_term = vf_coef * value_loss`` (what
    TorchRL calls ``loss_entropy`` and ``loss_critic``); the other scalars are the tracked stats.
    ``count`` is the number of elements the means ran over (the valid ones under a mask). ``ratio``,
    ``advantages`` (normalized and priority-weighted) and ``returns`` are kept for bridges
    that log or reuse them.
    """

    loss: Tensor
    entropy_term: Tensor
    value_term: Tensor
    policy_loss: Tensor
    value_loss: Tensor
    entropy: Tensor
    approx_kl: Tensor
    clipfrac: Tensor
    importance: Tensor
    current_logprobs: Tensor
    ratio: Tensor
    advantages: Tensor
    returns: Tensor
    count: int

    STATS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "importance", "current_logprobs")

    def stats(self) -> dict[str, float]:
        """The seven tracked stats as Python floats (SPEC §4.7)."""
        return {name: float(getattr(self, name).detach()) for name in self.STATS}

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_minibatch(named: dict[str, Tensor], shape: torch.Size) -> None:
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise MettaError(f"ppo_minibatch_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.shape != shape:
            raise MettaError(
                f"ppo_minibatch_loss: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} "
                f"([minibatch_segments, horizon], the shape of values)"
            )
    if len(shape) != 2 or shape.numel() == 0:
        raise MettaError(f"ppo_minibatch_loss: values must be a non-empty [mb, horizon] tensor, got {tuple(shape)}")
    finite = torch.stack([torch.isfinite(x.detach()).all() for x in named.values()])
    if not bool(finite.all()):
        bad = [name for name, ok in zip(named, finite.tolist()) if not ok]
        raise MettaError(f"ppo_minibatch_loss: non-finite values (NaN or inf) in {', '.join(bad)}")


def ppo_minibatch_loss(
    cfg: PPOConfig,
    *,
    old_logprob: Tensor,
    new_logprob: Tensor,
    entropy: Tensor,
    new_values: Tensor,
    values: Tensor,
    rewards: Tensor,
    dones: Tensor,
    advantages: Tensor,
    prio_weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> PPOTerms:
    """Metta's PPO loss for one minibatch of ``[mb, horizon]`` rows (SPEC §4.5-4.7).

    ``values`` are the values stored at rollout, ``advantages`` the first-pass advantages
    ``A0`` of these rows (``returns = advantages + values``), ``prio_weights`` the ``[mb, 1]``
    importance weights of the segment sampling (1 when ``None``)::

        ratio  = exp(clamp(new_logprob - old_logprob, -10, 10))
        A      = prio_w * normalize(compute_advantage(values, rewards, dones, ratio))  # no grad
        policy_loss = max(-A * ratio, -A * clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()
        value_loss  = 0.5 * max((new_v - R)^2, (v + clamp(new_v - v, -vf_clip, vf_clip) - R)^2).mean()
                      (0.5 * ((new_v - R)^2).mean() without clip_vloss)
        loss = policy_loss - ent_coef * entropy.mean() + vf_coef * value_loss

    ``approx_kl = ((ratio - 1) - logratio).mean()`` uses the unclamped log-ratio. With a boolean
    ``mask`` (padding), means and the normalization statistics run over its elements only; with
    no valid element every term is a zero still connected to the graph (so a learner with an
    empty shard makes the same backward and collective calls as the others).
    """
    named = {
        "old_logprob": old_logprob, "new_logprob": new_logprob, "entropy": entropy,
        "new_values": new_values, "values": values, "rewards": rewards, "dones": dones,
        "advantages": advantages,
    }
    _check_minibatch(named, values.shape)
    if prio_weights is not None and prio_weights.shape not in ((values.shape[0], 1), values.shape):
        raise MettaError(
            f"ppo_minibatch_loss: prio_weights has shape {tuple(prio_weights.shape)}, expected "
            f"({values.shape[0]}, 1) (one weight per segment) or {tuple(values.shape)}"
        )

    count = values.numel() if mask is None else int(mask.sum())

    def mean(x: Tensor) -> Tensor:
        if mask is None:
            return x.mean()
        # no valid element (an empty shard among several learners): a zero that keeps the graph
        return x[mask].mean() if count else (x * 0.0).sum()

    logratio = new_logprob - old_logprob
    ratio = logratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    vtrace = cfg.vtrace
    adv = compute_advantage(
        values, rewards, dones, ratio,
        gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, rho_clip=vtrace.rho_clip, c_clip=vtrace.c_clip,
    )
    adv = normalize_advantage(adv, cfg.norm_adv, mask=mask)
    if prio_weights is not None:
        adv = prio_weights * adv

    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * ratio.clamp(1.0 - cfg.clip_coef, 1.0 + cfg.clip_coef)
    policy_loss = mean(torch.max(pg_loss1, pg_loss2))

    returns = advantages + values
    v_loss_unclipped = (new_values - returns) ** 2
    if cfg.clip_vloss:
        v_clipped = values + (new_values - values).clamp(-cfg.vf_clip_coef, cfg.vf_clip_coef)
        value_loss = 0.5 * mean(torch.max(v_loss_unclipped, (v_clipped - returns) ** 2))
    else:
        value_loss = 0.5 * mean(v_loss_unclipped)
    entropy_mean = mean(entropy)
    entropy_term = -cfg.ent_coef * entropy_mean
    value_term = cfg.vf_coef * value_loss
    loss = policy_loss + entropy_term + value_term

    with torch.no_grad():
        approx_kl = mean((ratio - 1) - logratio)
        clipfrac = mean(((ratio - 1.0).abs() > cfg.clip_coef).float())
        importance = mean(ratio)
        current_logprobs = mean(new_logprob)
    return PPOTerms(
        loss=loss, entropy_term=entropy_term, value_term=value_term, policy_loss=policy_loss, value_loss=value_loss, entropy=entropy_mean,
        approx_kl=approx_kl, clipfrac=clipfrac, importance=importance,
        current_logprobs=current_logprobs, ratio=ratio, advantages=adv, returns=returns,
        count=count,
    )


def explained_variance(advantages: Tensor, values: Tensor) -> float:
    """``1 - var(A0) / var(A0 + values)`` over all elements (unbiased var); 0 if the denominator is 0."""
    denominator = (advantages + values).var()
    if float(denominator) == 0.0:
        return 0.0
    return float(1.0 - advantages.var() / denominator)
