"""Metta's PPO loss for one RLlib module on one Metta-layout minibatch (SPEC §4.4-4.7).

The math is ``metta_core.ppo_math.ppo_minibatch_loss``; this module only reads RLlib columns,
runs the module's action distribution and value head, and reshapes flat ``[mb * horizon]`` rows
to ``[mb, horizon]``. ``MettaSelfSupervisedLoss`` puts the same loss on an RLModule so that any
Learner (a stock one too) calls it through RLlib's ``SelfSupervisedLossAPI``.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from ray.rllib.algorithms.ppo.ppo import LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.core.rl_module.apis.self_supervised_loss_api import SelfSupervisedLossAPI
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI

from bridges.rllib.config import metta_settings
from bridges.rllib.layout import MettaColumns, check_metta_batch
from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import PPOTerms, ppo_minibatch_loss

RLLIB_STAT_KEYS = {"policy_loss": POLICY_LOSS_KEY, "value_loss": VF_LOSS_KEY, "entropy": ENTROPY_KEY}
"""Metta's tracked stat name -> RLlib's metric key, where RLlib has one; others keep Metta's name."""

RLLIB_ALIASES = {"explained_variance": LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY}
"""Metta stats also logged under the name RLlib's PPO uses (``vf_explained_var``), for dashboards
and Tune stoppers that read it; the Metta name stays."""


def rllib_stats(stats: Dict[str, float]) -> Dict[str, float]:
    """Rename Metta's tracked stats to RLlib's metric keys (``policy_loss``, ``vf_loss``, ``entropy``)
    and add RLlib's name of ``explained_variance`` (``vf_explained_var``) next to Metta's."""
    out = {RLLIB_STAT_KEYS.get(k, k): v for k, v in stats.items()}
    out.update({RLLIB_ALIASES[k]: v for k, v in stats.items() if k in RLLIB_ALIASES})
    return out


def check_action_shape(dist, actions: torch.Tensor) -> None:
    """Refuse actions whose shape is not the distribution's sample shape (e.g. continuous actions
    ``[n]`` for a ``[n, 1]`` Box: ``logp`` would broadcast to ``[n, n]`` and sum silently)."""
    torch_dist = getattr(dist, "_dist", None)
    if not isinstance(torch_dist, torch.distributions.Distribution):
        return
    expected = tuple(torch_dist.batch_shape + torch_dist.event_shape)
    if tuple(actions.shape) != expected:
        raise MettaError(
            f"Metta PPO loss: column {Columns.ACTIONS!r} has shape {tuple(actions.shape)}, expected {expected} "
            f"(one action of the module's action space per slot, as {type(dist).__name__} samples it); "
            f"reshape it, e.g. actions.reshape({', '.join(str(d) for d in expected)})"
        )


def metta_loss_terms(
    module, batch: Dict[str, Any], fwd_out: Dict[str, Any], ppo: PPOConfig, horizon: int
) -> PPOTerms:
    """``ppo_minibatch_loss`` on a flat Metta-layout minibatch of whole rows.

    ``new_logprob = dist(fwd_out[ACTION_DIST_INPUTS]).logp(batch[ACTIONS])``, ``entropy`` of the
    same distribution, ``new_values = module.compute_values(batch, embeddings)`` (or
    ``fwd_out[VF_PREDS]`` when given: a stateful module's values of the rows); stored
    ``ACTION_LOGP``, ``VF_PREDS``, ``REWARDS``, ``TERMINATEDS`` (Metta's index convention),
    ``ADVANTAGES`` (``A0``), ``LOSS_MASK`` and optional ``MettaColumns.PRIO_WEIGHTS``.
    A minibatch without any valid slot (an empty shard on one of several learners) still runs
    the normalization's collective call, and its loss is a graph-connected zero, so the backward
    pass (and DDP's gradient all-reduce) happens on every learner.
    """
    if not isinstance(module, ValueFunctionAPI):
        raise MettaError(
            f"Metta's PPO loss needs an RLModule implementing ValueFunctionAPI (compute_values); "
            f"{type(module).__name__} does not"
        )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # one learner normalizes over its own valid slots: it needs 2 (several learners pool theirs)
    check_metta_batch(batch, horizon, where="Metta PPO loss", min_valid=2 if ppo.norm_adv and not distributed else 0)
    if Columns.ACTION_DIST_INPUTS not in fwd_out:
        raise MettaError(
            f"Metta PPO loss: forward_train output has no {Columns.ACTION_DIST_INPUTS!r} (got {sorted(fwd_out)}); "
            f"the RLModule must return action distribution inputs"
        )
    rows = (-1, horizon)
    dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
    check_action_shape(dist, batch[Columns.ACTIONS])
    new_logprob = dist.logp(batch[Columns.ACTIONS]).reshape(rows)
    entropy = dist.entropy().reshape(rows)
    if Columns.VF_PREDS in fwd_out:  # a stateful module's values, computed on its rows (bridges.rllib.recurrent)
        new_values = fwd_out[Columns.VF_PREDS].reshape(rows)
    else:
        new_values = module.compute_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS)).reshape(rows)
    mask = batch[Columns.LOSS_MASK].reshape(rows)
    prio = batch.get(MettaColumns.PRIO_WEIGHTS)
    terms = ppo_minibatch_loss(
        ppo,
        old_logprob=batch[Columns.ACTION_LOGP].reshape(rows),
        new_logprob=new_logprob,
        entropy=entropy,
        new_values=new_values,
        values=batch[Columns.VF_PREDS].reshape(rows),
        rewards=batch[Columns.REWARDS].reshape(rows),
        dones=batch[Columns.TERMINATEDS].reshape(rows),
        advantages=batch[Columns.ADVANTAGES].reshape(rows),
        prio_weights=None if prio is None else prio.reshape(rows),
        mask=mask,
    )
    return terms


def metta_module_loss(*, learner, module_id, config, batch: Dict[str, Any], fwd_out: Dict[str, Any]) -> torch.Tensor:
    """The Metta loss of ``module_id``: what both the learner and the module hook return.

    A ``MettaPPOLearner`` tracks the stats for its phase means (``record_metta_terms``); any other
    Learner gets them logged to its ``MetricsLogger`` under ``module_id`` (window 1).
    """
    ppo, trainer = metta_settings(config)
    module = learner.module[module_id].unwrapped()
    terms = metta_loss_terms(module, batch, fwd_out, ppo, trainer.bptt_horizon)
    record = getattr(learner, "record_metta_terms", None)
    if record is not None:
        record(module_id, terms)
    elif bool(batch[Columns.LOSS_MASK].any()):
        learner.metrics.log_dict(rllib_stats(terms.stats()), key=module_id, window=1)
    return terms.loss


class MettaSelfSupervisedLoss(SelfSupervisedLossAPI):
    """Mixin for an RLModule with an action distribution and ``ValueFunctionAPI``: carries Metta's loss.

    ``class MyModule(MettaSelfSupervisedLoss, DefaultPPOTorchRLModule): pass``. Every Learner calls
    ``compute_self_supervised_loss`` for such a module instead of its own loss. The batch must be
    in the Metta layout with whole rows per minibatch: use ``MettaLayoutConnector`` as the learner
    pipeline (``metta_ppo_config`` does), and with a stock Learner also
    ``shuffle_batch_per_epoch=False`` and a ``minibatch_size`` that is a multiple of
    ``bptt_horizon`` (RLlib's minibatch iterator then cuts whole rows). Segment prioritization,
    target-KL stop and accumulation are the Learner's part: ``MettaPPOLearner`` does them.
    """

    def compute_self_supervised_loss(self, *, learner, module_id, config, batch, fwd_out, **kwargs):
        return metta_module_loss(learner=learner, module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
