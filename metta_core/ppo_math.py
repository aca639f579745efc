"""The PPO math of one Metta training phase as pure tensor functions (SPEC §4.2-4.7).

Every bridge calls these; nothing else in the project computes the PPO formulas.
Minibatch tensors are ``[mb, horizon]`` rows in Metta's layout (SPEC §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from metta_core.advantage import compute_advantage, flag_problem, flag_violation, normalize_advantage
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


Mean = Callable[[Tensor], Tensor]
"""How a piece averages its per-element terms: ``torch.mean``, or a masked mean (``ppo_minibatch_loss``)."""


def _same_shape(piece: str, **named: Tensor) -> None:
    (first, reference), *rest = named.items()
    for name, x in rest:
        if x.shape != reference.shape:
            raise MettaError(
                f"{piece}: {name} has shape {tuple(x.shape)} but {first} has {tuple(reference.shape)}; "
                f"every argument is one value per (segment, t)"
            )


# -- the pieces of one minibatch's loss (rlax style) ---------------------------------------------
# Every argument is one value per element of the [mb, horizon] rows: the element at column t
# belongs to observation o_t and the action a_t taken there, for t in [0, horizon-1]. The rewards
# enter only through the advantages and returns (SPEC §2).

def importance_ratio(new_logprob_t: Tensor, old_logprob_t: Tensor) -> Tensor:
    """``rho_t = exp(clamp(new_logprob_t - old_logprob_t, -10, 10))`` (SPEC §4.5), elementwise.

    ``new_logprob_t``: log pi(a_t | o_t) under the policy being trained, times [0, horizon-1];
    ``old_logprob_t``: log mu(a_t | o_t) stored at rollout (the behaviour policy), same times.
    The clamp bounds the ratio to [e^-10, e^10]; ``approx_kl`` uses the unclamped log-ratio.
    """
    _same_shape("importance_ratio", new_logprob_t=new_logprob_t, old_logprob_t=old_logprob_t)
    return (new_logprob_t - old_logprob_t).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()


def clipped_surrogate_pg_loss(ratio_t: Tensor, adv_t: Tensor, *, clip_coef: float, mean: Mean = torch.mean) -> Tensor:
    """PPO's clipped surrogate policy loss (SPEC §4.6; Schulman et al. 2017, eq. 7, negated)::

        policy_loss = mean(max(-adv_t * ratio_t, -adv_t * clamp(ratio_t, 1 - clip_coef, 1 + clip_coef)))

    ``ratio_t``: ``importance_ratio`` of a_t, times [0, horizon-1] (gradients flow through it);
    ``adv_t``: advantage of a_t, times [0, horizon-1], already normalized and priority-weighted
    (constant here: Metta computes it without grad).
    """
    _same_shape("clipped_surrogate_pg_loss", ratio_t=ratio_t, adv_t=adv_t)
    unclipped = -adv_t * ratio_t
    clipped = -adv_t * ratio_t.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    return mean(torch.max(unclipped, clipped))


def clipped_value_loss(
    new_v_t: Tensor,
    v_t: Tensor,
    returns_t: Tensor,
    *,
    vf_clip_coef: float,
    clip_vloss: bool = True,
    mean: Mean = torch.mean,
) -> Tensor:
    """Metta's critic loss, with the 1/2 factor (SPEC §4.6)::

        v_clipped_t = v_t + clamp(new_v_t - v_t, -vf_clip_coef, vf_clip_coef)
        clip_vloss:  0.5 * mean(max((new_v_t - returns_t)^2, (v_clipped_t - returns_t)^2))
        otherwise:   0.5 * mean((new_v_t - returns_t)^2)

    ``new_v_t``: V(o_t) under the critic being trained, times [0, horizon-1] (gradients flow);
    ``v_t``: V(o_t) stored at rollout, same times; ``returns_t = A0_t + v_t`` with the first-pass
    advantage ``A0`` (so the last column's return is ``v_t`` itself). The clip bounds the change
    of the value, not the squared error.
    """
    _same_shape("clipped_value_loss", new_v_t=new_v_t, v_t=v_t, returns_t=returns_t)
    unclipped = (new_v_t - returns_t) ** 2
    if not clip_vloss:
        return 0.5 * mean(unclipped)
    v_clipped = v_t + (new_v_t - v_t).clamp(-vf_clip_coef, vf_clip_coef)
    return 0.5 * mean(torch.max(unclipped, (v_clipped - returns_t) ** 2))


def entropy_loss(entropy_t: Tensor, *, mean: Mean = torch.mean) -> Tensor:
    """``-mean(entropy_t)``: minimizing it raises the policy's entropy (SPEC §4.6, rlax's sign).

    ``entropy_t``: entropy of pi(. | o_t), times [0, horizon-1]. The loss adds
    ``ent_coef * entropy_loss``; the tracked ``entropy`` stat is ``-entropy_loss``.
    """
    return -mean(entropy_t)


@torch.no_grad()
def approx_kl(new_logprob_t: Tensor, old_logprob_t: Tensor, ratio_t: Tensor, *, mean: Mean = torch.mean) -> Tensor:
    """Schulman's k3 estimate of KL(mu || pi): ``mean((ratio_t - 1) - (new_logprob_t - old_logprob_t))`` (SPEC §4.6).

    The log-ratio is not clamped (``ratio_t`` is); all three arguments at times [0, horizon-1].
    A tracked stat: no gradient.
    """
    _same_shape("approx_kl", new_logprob_t=new_logprob_t, old_logprob_t=old_logprob_t, ratio_t=ratio_t)
    return mean((ratio_t - 1) - (new_logprob_t - old_logprob_t))


@torch.no_grad()
def clip_fraction(ratio_t: Tensor, *, clip_coef: float, mean: Mean = torch.mean) -> Tensor:
    """``mean(|ratio_t - 1| > clip_coef)`` as float (SPEC §4.6), ``ratio_t`` at times [0, horizon-1]; no gradient."""
    return mean(((ratio_t - 1.0).abs() > clip_coef).float())


# -- one minibatch -------------------------------------------------------------------------------

def _check_minibatch(named: dict[str, Tensor], shape: torch.Size) -> None:
    """Types and shapes (no device sync)."""
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise MettaError(f"ppo_minibatch_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
    if len(shape) != 2 or shape.numel() == 0:
        raise MettaError(
            f"ppo_minibatch_loss: values must be a non-empty [minibatch_segments, horizon] tensor, got shape "
            f"{tuple(shape)}; reshape flat data to [segments, horizon] rows"
        )
    for name, x in named.items():
        if x.shape != shape:
            raise MettaError(
                f"ppo_minibatch_loss: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} "
                f"([minibatch_segments, horizon], the shape of values)"
            )


def _check_values(named: dict[str, Tensor], prio_weights: Tensor | None, loss: Tensor) -> None:
    """Every input finite, ``dones`` 0/1, ``prio_weights`` finite and > 0, and the loss finite, in ONE
    fused reduction (one device sync per minibatch); the per-tensor diagnosis runs only on failure.

    A sum is finite unless an element is NaN/inf or the sum overflows; an overflowing sum of finite
    inputs with a finite loss is harmless, so it passes after the diagnosis finds nothing.
    """
    parts = [x.detach().sum() for x in named.values()]
    parts.append(flag_violation(named["dones"]))
    if prio_weights is not None:
        parts += [prio_weights.detach().sum(), (prio_weights.detach() <= 0).sum().to(parts[0].dtype)]
    parts.append(loss.detach())
    summary = torch.stack([p.to(torch.float32) for p in parts]).tolist()
    flags_ok = summary[len(named)] == 0
    prio_ok = prio_weights is None or summary[-2] == 0
    if all(map(math.isfinite, summary)) and flags_ok and prio_ok:
        return
    bad = [name for name, x in named.items() if not bool(torch.isfinite(x.detach()).all())]
    if bad:
        raise MettaError(
            f"ppo_minibatch_loss: non-finite values (NaN or inf) in {', '.join(bad)}; the loss would be NaN. "
            f"Check the environment / network that produced {bad[0]}"
        )
    problem = flag_problem(named["dones"], "dones", "ppo_minibatch_loss")
    if problem:
        raise MettaError(problem)
    if prio_weights is not None and not bool((torch.isfinite(prio_weights) & (prio_weights > 0)).all()):
        raise MettaError(
            f"ppo_minibatch_loss: prio_weights must be finite and > 0 (importance weights (segments * p) ** -beta), "
            f"got min {float(prio_weights.min())}; pass the weights prioritized_sample returns"
        )
    if not math.isfinite(summary[-1]):
        scales = {name: float(named[name].detach().abs().max()) for name in ("rewards", "values", "advantages", "new_values")}
        raise MettaError(
            f"ppo_minibatch_loss: the loss is {summary[-1]} although every input is finite: the numbers overflow "
            f"float32 (max |x|: " + ", ".join(f"{k} {v:.3g}" for k, v in scales.items()) + "); scale the rewards "
            f"down (e.g. divide them by a constant) or check the environment / value network"
        )


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
    """Metta's PPO loss for one minibatch of ``[mb, horizon]`` rows (SPEC §4.5-4.7), from the pieces above.

    ``values`` are the values stored at rollout, ``rewards``/``dones`` the buffer's (Metta layout,
    SPEC §1: ``rewards[:, t+1]`` followed the action at ``t``), ``advantages`` the first-pass
    advantages ``A0`` of these rows (``returns = advantages + values``), ``prio_weights`` the
    ``[mb, 1]`` importance weights of the segment sampling (1 when ``None``)::

        ratio = importance_ratio(new_logprob, old_logprob)
        A     = prio_w * normalize_advantage(compute_advantage(values, rewards, dones, ratio))  # no grad
        loss  = clipped_surrogate_pg_loss(ratio, A) + ent_coef * entropy_loss(entropy)
                + vf_coef * clipped_value_loss(new_values, values, returns)

    With a boolean ``mask`` (padding), means and the normalization statistics run over its
    elements only; with no valid element every term is a zero still connected to the graph (so a
    learner with an empty shard makes the same backward and collective calls as the others).

    Checked (``MettaError`` naming the argument): types and shapes; then, in one fused reduction
    after the computation, that every input is finite, ``dones`` are 0/1 flags, ``prio_weights``
    are > 0 and the loss did not overflow float32.
    """
    named = {
        "old_logprob": old_logprob, "new_logprob": new_logprob, "entropy": entropy,
        "new_values": new_values, "values": values, "rewards": rewards, "dones": dones,
        "advantages": advantages,
    }
    _check_minibatch(named, values.shape)
    if prio_weights is not None and not isinstance(prio_weights, Tensor):
        raise MettaError(f"ppo_minibatch_loss: prio_weights must be a torch.Tensor or None, got {type(prio_weights).__name__}")
    if prio_weights is not None and prio_weights.shape not in ((values.shape[0], 1), values.shape):
        raise MettaError(
            f"ppo_minibatch_loss: prio_weights has shape {tuple(prio_weights.shape)}, expected "
            f"({values.shape[0]}, 1) (one weight per segment) or {tuple(values.shape)}"
        )

    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != values.shape):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise MettaError(
            f"ppo_minibatch_loss: mask must be a bool tensor of shape {tuple(values.shape)} (True = a valid slot), "
            f"got {got}; convert it with mask.bool()"
        )
    count = values.numel() if mask is None else int(mask.sum())

    def mean(x: Tensor) -> Tensor:
        if mask is None:
            return x.mean()
        # no valid element (an empty shard among several learners): a zero that keeps the graph
        return x[mask].mean() if count else (x * 0.0).sum()

    ratio = importance_ratio(new_logprob, old_logprob)
    vtrace = cfg.vtrace
    adv = compute_advantage(
        values, rewards, dones, ratio,
        gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, rho_clip=vtrace.rho_clip, c_clip=vtrace.c_clip,
        check_values=False,  # checked below with everything else, in one reduction
    )
    adv = normalize_advantage(adv, enabled=cfg.norm_adv, mask=mask)
    if prio_weights is not None:
        adv = prio_weights * adv
    returns = advantages + values

    policy_loss = clipped_surrogate_pg_loss(ratio, adv, clip_coef=cfg.clip_coef, mean=mean)
    value_loss = clipped_value_loss(new_values, values, returns, vf_clip_coef=cfg.vf_clip_coef,
                                    clip_vloss=cfg.clip_vloss, mean=mean)
    neg_entropy = entropy_loss(entropy, mean=mean)
    entropy_term = cfg.ent_coef * neg_entropy
    value_term = cfg.vf_coef * value_loss
    loss = policy_loss + entropy_term + value_term
    _check_values(named, prio_weights, loss)

    with torch.no_grad():
        importance = mean(ratio)
        current_logprobs = mean(new_logprob)
    return PPOTerms(
        loss=loss, entropy_term=entropy_term, value_term=value_term, policy_loss=policy_loss,
        value_loss=value_loss, entropy=-neg_entropy,
        approx_kl=approx_kl(new_logprob, old_logprob, ratio, mean=mean),
        clipfrac=clip_fraction(ratio, clip_coef=cfg.clip_coef, mean=mean),
        importance=importance, current_logprobs=current_logprobs, ratio=ratio, advantages=adv,
        returns=returns, count=count,
    )


def explained_variance(advantages: Tensor, values: Tensor) -> float:
    """``1 - var(A0) / var(A0 + values)`` over all elements (unbiased var); 0 if the denominator is 0."""
    denominator = (advantages + values).var()
    if float(denominator) == 0.0:
        return 0.0
    return float(1.0 - advantages.var() / denominator)
