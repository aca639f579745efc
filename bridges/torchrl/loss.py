"""``MettaPPOLoss``: Metta's PPO (SPEC §4.5-4.7) as a TorchRL ``LossModule``.

The loss only maps keys and layout; every number comes from
:func:`metta_core.ppo_math.ppo_minibatch_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
from pydantic import ValidationError
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import (
    CompositeDistribution,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    composite_lp_aggregate,
    dispatch,
)
from tensordict.utils import NestedKey, unravel_key
from torch import Tensor
from torchrl.modules import set_recurrent_mode
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators, dispatch_value_estimator
from torchrl.objectives.value import ValueEstimatorBase

from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.phase import PhaseStats
from metta_core.ppo_math import explained_variance, ppo_minibatch_loss

from bridges.torchrl.estimator import MettaAdvantage
from bridges.torchrl.layout import (
    as_rows, blame_inputs, check_estimator_hyperparams, check_values, metta_rewards_dones, read_bt,
)
from bridges.torchrl.recurrent import prepare_rows, recurrent_modules

COEFFICIENTS = ("clip_coef", "ent_coef", "vf_coef", "vf_clip_coef")
"""``PPOConfig`` fields held as schedulable buffers (``loss.ent_coef = 0.005``)."""

TORCHRL_ALIASES = {
    "clip_epsilon": "clip_coef",
    "entropy_coeff": "ent_coef",
    "critic_coeff": "vf_coef",
}
"""TorchRL ``ClipPPOLoss`` names accepted for the Metta coefficient with the same meaning.
``clip_value`` is not a plain alias: see :func:`clip_value_settings`."""

REDUCTIONS = (None, "mean")
"""TorchRL ``reduction`` values with Metta's meaning (a mean over the call; ``None`` = TorchRL's default)."""


class MissingEntryError(MettaError, KeyError):
    """A tensordict entry the loss needs is missing: a ``MettaError`` that is also the ``KeyError``
    TorchRL's losses raise there (so ``except KeyError`` written for ``ClipPPOLoss`` still works)."""

    __str__ = BaseException.__str__  # the message as written, not KeyError's repr of it


def clip_value_settings(clip_value: Any, clip_coef: float) -> dict[str, Any]:
    """``PPOConfig`` updates for TorchRL's ``clip_value`` argument, with ``ClipPPOLoss``'s meaning:

    - ``True``: clip the value at ``clip_epsilon`` (its value now): ``clip_vloss``, ``vf_clip_coef = clip_coef``;
    - ``False`` / ``None`` / ``0``: no value clipping: ``clip_vloss = False``;
    - a float or a one-element tensor ``c > 0``: ``clip_vloss``, ``vf_clip_coef = c``.
    """
    if clip_value is None or clip_value is False:
        return {"clip_vloss": False}
    if clip_value is True:
        return {"clip_vloss": True, "vf_clip_coef": clip_coef}
    if isinstance(clip_value, Tensor):
        if clip_value.numel() != 1:
            raise MettaError(f"clip_value must be a float or a scalar tensor, got shape {tuple(clip_value.shape)}")
        clip_value = clip_value.item()
    if not isinstance(clip_value, (int, float)):
        raise MettaError(f"clip_value must be a bool, None, a float or a scalar tensor, got {clip_value!r}")
    if clip_value == 0:
        return {"clip_vloss": False}
    return {"clip_vloss": True, "vf_clip_coef": float(clip_value)}


def single_key(key: Any, name: str, who: str) -> NestedKey:
    """TorchRL's list-of-keys form (``set_keys(sample_log_prob=[key])``) with one key, as that key;
    more keys are several action heads, which Metta's loss does not take."""
    if isinstance(key, list):
        if len(key) != 1:
            raise MettaError(
                f"{who}: {name} keys {key}: Metta's loss takes one log-prob per step (one action head); "
                f"use a single distribution, or a composite distribution with one head"
            )
        key = key[0]
    return unravel_key(key)

OUT_KEYS = (
    "loss_objective", "loss_critic", "loss_entropy", "entropy", "kl_approx", "clip_fraction", "importance",
    "explained_variance", "policy_loss", "value_loss", "approx_kl", "clipfrac", "current_logprobs",
)
"""``MettaPPOLoss``'s outputs, in the order of the keyword call's returned tuple."""

ESTIMATOR_CONFIG_FIELDS = {
    "gamma": "gamma",
    "gae_lambda": "gae_lambda",
    "rho_clip": "vtrace.rho_clip",
    "c_clip": "vtrace.c_clip",
}
"""``make_value_estimator(MettaAdvantage, **hp)`` names and the ``PPOConfig`` path each sets."""


_UNSET: Any = object()
"""Default of arguments whose absence differs from every value (``clip_value``)."""


class MettaPPOLoss(LossModule):
    """Metta's clipped PPO with V-trace advantage recompute, on TorchRL ``[B, T]`` batches.

    Args:
        actor_network: a ``ProbabilisticTensorDictSequential`` (e.g. ``ProbabilisticActor``) whose
            distribution has ``log_prob`` and ``entropy`` (Categorical for discrete actions).
        critic_network: a ``ValueOperator`` writing the ``value`` key.
        config: Metta's ``PPOConfig`` (defaults when ``None``); copied.
        functional: as in TorchRL's ``ClipPPOLoss``: whether the networks are functionalized
            (``convert_to_functional``; their parameters live in ``actor_network_params`` /
            ``critic_network_params`` and are swapped in for each call). ``False`` keeps the
            networks as they are: no swap per call (a measurable cost on small networks; TorchRL
            also names it the setting for DDP/FSDP-wrapped networks). Same numbers either way; a
            ``state_dict`` of one setting does not load into the other. Defaults to ``True``.
        separate_losses: as in TorchRL: the critic loss does not reach parameters the critic shares
            with the actor, nor a trunk whose output the critic reads. Defaults to ``False``.
        reduction: ``None`` or ``"mean"`` (the same: Metta's loss is one mean over the call);
            ``"none"`` / ``"sum"`` are refused.
        device: where the coefficient buffers (and the networks) go; defaults to the networks'.
        clip_value: ``ClipPPOLoss``'s meaning (:func:`clip_value_settings`): ``True`` clips the value
            at ``clip_epsilon``, ``False`` / ``None`` turns value clipping off, a float sets
            ``vf_clip_coef``. Absent: the config's ``clip_vloss`` / ``vf_clip_coef``.
        **overrides: ``PPOConfig`` top-level fields (``ent_coef=0.02``) or the TorchRL aliases
            ``clip_epsilon``, ``entropy_coeff``, ``critic_coeff``. TorchRL arguments with no Metta
            meaning (``loss_critic_type``, ``samples_mc_entropy``, ``entropy_bonus``, asymmetric
            ``clip_epsilon``, per-head ``entropy_coeff``) are refused, naming the alternative
            (``docs/torchrl_conventions.md``).

    Input: a ``[B, T]`` tensordict (time last, see ``bridges.torchrl.layout``) with the actor
    and critic inputs, ``action``, the behaviour log-prob (``sample_log_prob`` key, following
    the actor's ``log_prob_keys``), ``value`` recorded at collection, ``("next", reward)``,
    ``("next", terminated)``, optionally ``advantage`` (first pass) and ``priority_weight``.
    Without ``advantage`` the value estimator computes it (and fills a missing ``value`` from the
    critic); with ``advantage`` and no ``value``, a ``KeyError`` (:class:`MissingEntryError`).
    Or keyword tensors (``loss(observation=..., next_reward=...)``): the ``out_keys`` as a tuple.
    A batch in TorchRL's multi-agent group layout (``("agents", key)`` entries of batch
    ``[B, T, agents]``) is folded into rows ``b * agents + a`` first (``layout.as_rows``).

    Per call (SPEC §1, §4.4-4.6), with Metta's ``rewards[:, t+1] = ("next", reward)[:, t]`` and
    ``dones[:, t+1] = ("next", terminated)[:, t]``:

        A0    = td[advantage] if present, else value_estimator(td)[advantage]  (first pass, w = 1)
        terms = ppo_minibatch_loss(cfg, old_logprob, new_logprob, entropy, new_values,
                                   values, rewards, dones, A0, prio_weights=td[priority_weight])

    which recomputes the V-trace advantage with the new ratio, normalizes it over the call and
    multiplies it by ``priority_weight``; ``returns = A0 + values``. Output::

        loss_objective = policy_loss
        loss_critic    = vf_coef * value_loss
        loss_entropy   = -ent_coef * entropy          (sum of the three = Metta's loss)

    plus detached logging entries ``entropy``, ``kl_approx`` (= Metta's ``approx_kl``,
    ``((ratio - 1) - log_ratio).mean()``), ``clip_fraction``, ``importance``,
    ``explained_variance`` (of ``A0`` over the call), and Metta's names ``policy_loss``,
    ``value_loss``, ``approx_kl``, ``clipfrac``, ``current_logprobs``.

    State (``state_dict``): the coefficient buffers, ``anneal_beta``, and as extra state the
    config and the stats tracker (SPEC §4.7, §5), so a restored loss continues identically.
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys the loss reads, settable with ``loss.set_keys(name=key)``.

        Attributes:
            advantage: first-pass advantage ``A0`` (read if present, else written by the estimator).
            value_target: written by the estimator (``A0 + value``); not read by the loss.
            value: ``V(o_t)`` recorded at collection; also the critic's output key.
            sample_log_prob: behaviour log-prob of ``action``; TorchRL's default name, replaced
                by the actor's ``log_prob_keys`` when it has them.
            action: the action taken at ``t``.
            reward: read under ``"next"``: the reward that followed ``action[t]``.
            done: read under ``"next"``; only TorchRL's estimators use it (Metta reads terminal flags).
            terminated: read under ``"next"``: the terminal flag that followed ``action[t]``.
            priority_weight: ``[B, T]`` (or ``[B, T, 1]``) segment importance weight, multiplied
                into the advantage when present.
        """

        advantage: NestedKey = "advantage"
        value_target: NestedKey = "value_target"
        value: NestedKey = "state_value"
        sample_log_prob: NestedKey | None = None
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        priority_weight: NestedKey = "priority_weight"

        def __post_init__(self) -> None:
            if self.sample_log_prob is None:
                self.sample_log_prob = "sample_log_prob" if composite_lp_aggregate(nowarn=True) else "action_log_prob"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    default_value_estimator = MettaAdvantage
    _schedulable_buffers = frozenset((*COEFFICIENTS, "anneal_beta", *TORCHRL_ALIASES, "clip_value"))
    """Metta's coefficient buffers, and TorchRL's names that reach them (``loss.entropy_coeff = 0.01``)."""
    SUPPORTED_VALUE_ESTIMATORS = (
        ValueEstimators.TD0, ValueEstimators.TD1, ValueEstimators.GAE, ValueEstimators.TDLambda, ValueEstimators.VTrace,
        ValueEstimators.MAGAE,  # on single-agent [B, T] rows TorchRL's MultiAgentGAE is its GAE
    )

    actor_network: ProbabilisticTensorDictSequential
    critic_network: TensorDictModule
    actor_network_params: TensorDictParams
    critic_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_critic_network_params: TensorDictParams

    def __init__(
        self,
        actor_network: ProbabilisticTensorDictSequential,
        critic_network: TensorDictModule,
        config: PPOConfig | None = None,
        *,
        functional: bool = True,
        separate_losses: bool = False,
        reduction: str | None = None,
        device: torch.device | str | None = None,
        clip_value: Any = _UNSET,
        **overrides: Any,
    ) -> None:
        who = type(self).__name__
        if reduction not in REDUCTIONS:
            raise MettaError(
                f"{who}: reduction={reduction!r} is not supported: Metta's loss is one mean over the call "
                f"(the advantage is normalized over it, SPEC §4.5), so per-step or summed losses are not "
                f"defined; use reduction='mean' (or None, the same)"
            )
        _refuse_torchrl_only(overrides, who)
        base = (config or PPOConfig()).model_copy(deep=True)
        _validated_update(base, {TORCHRL_ALIASES.get(k, k): v for k, v in overrides.items()}, who)
        if clip_value is not _UNSET:
            _validated_update(base, clip_value_settings(clip_value, base.clip_coef), who)
        if not hasattr(actor_network, "get_dist"):
            raise MettaError(
                f"{who}: actor_network must be a ProbabilisticTensorDictSequential (e.g. "
                f"torchrl.modules.ProbabilisticActor) with get_dist, got {type(actor_network).__name__}"
            )
        self._in_keys = None
        self._out_keys = None
        self._functional = functional
        super().__init__()
        self.separate_losses = bool(separate_losses)
        self.reduction = "mean"
        if functional:
            self.convert_to_functional(actor_network, "actor_network")
            # with separate_losses, parameters the critic shares with the actor get no critic gradient
            # (TorchRL's compare_against: the critic's copies of them are detached)
            shared = list(actor_network.parameters()) if separate_losses else None
            self.convert_to_functional(critic_network, "critic_network", compare_against=shared)
        else:
            shared = {id(p) for p in actor_network.parameters()} & {id(p) for p in critic_network.parameters()}
            if separate_losses and shared:
                raise MettaError(
                    f"{who}: separate_losses=True with functional=False cannot keep the critic loss off the "
                    f"{len(shared)} parameter(s) the critic shares with the actor (only the functional loss "
                    f"holds detached copies of them); use functional=True"
                )
            self.actor_network, self.actor_network_params = actor_network, None
            self.critic_network, self.critic_network_params = critic_network, None
        self._recurrent = recurrent_modules(actor_network, critic_network)
        self._actor_in_keys = _external_in_keys(actor_network)
        self._critic_in_keys = _external_in_keys(critic_network)
        self._base_config = base
        self._config_cache: tuple[dict[str, float], PPOConfig] | None = None
        if device is None:
            device = next(iter(self.parameters()), torch.empty(0)).device
        for name in COEFFICIENTS:
            self.register_coeff_buffer(name, getattr(base, name), device=device, dtype=torch.float64)
        beta0 = base.prioritized_experience_replay.prio_beta0
        self.register_buffer("anneal_beta", torch.tensor(beta0, dtype=torch.float64, device=device))
        self.phase_stats = PhaseStats()

        log_prob_keys = getattr(actor_network, "log_prob_keys", None)
        if log_prob_keys:
            if len(log_prob_keys) > 1:
                raise MettaError(
                    f"{who}: the actor has several action heads (log_prob_keys {log_prob_keys}); "
                    f"Metta's loss takes one log-prob per step: use a single distribution"
                )
            self.set_keys(sample_log_prob=log_prob_keys[0], action=actor_network.dist_sample_keys[0])
        self.to(device)

    @property
    def functional(self) -> bool:
        return self._functional

    def _parameters_of(self, name: str) -> Any:
        """Context that runs network ``name`` (``"actor"`` / ``"critic"``) with the loss's parameters:
        TorchRL's swap when functional (``preserve_module_state=False``, as its losses do), else nothing."""
        if not self._functional:
            return nullcontext()
        return getattr(self, f"{name}_network_params").to_module(
            getattr(self, f"{name}_network"), preserve_module_state=False
        )

    # --- coefficients -----------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "clip_value":
            self._set_clip_value(value)
            return
        super().__setattr__(TORCHRL_ALIASES.get(name, name), value)

    def __getattr__(self, name: str) -> Any:
        if name == "clip_value":
            return super().__getattr__("vf_clip_coef") if self._base_config.clip_vloss else None
        if name in TORCHRL_ALIASES:
            return super().__getattr__(TORCHRL_ALIASES[name])
        return super().__getattr__(name)

    def _set_clip_value(self, clip_value: Any) -> None:
        """``loss.clip_value = x`` with ``ClipPPOLoss``'s meaning (:func:`clip_value_settings`)."""
        settings = clip_value_settings(clip_value, float(self.clip_coef))
        if settings["clip_vloss"] != self._base_config.clip_vloss:
            _validated_update(self._base_config, {"clip_vloss": settings["clip_vloss"]}, type(self).__name__)
            self._config_cache = None
        if "vf_clip_coef" in settings:
            self.vf_clip_coef = settings["vf_clip_coef"]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "MettaPPOLoss":
        """``to`` / ``double`` / ``half`` / ``cuda``: the networks are cast; the coefficient buffers
        move to the new device but stay float64, since they are config values (a ``half()`` would
        round ``clip_coef`` and change the loss)."""
        kept = {name: self._buffers[name] for name in self._schedulable_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, *args, **kwargs)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    @property
    def config(self) -> PPOConfig:
        """The ``PPOConfig`` this loss computes with: the base config plus the current buffers (a copy)."""
        return self._current_config().model_copy(deep=True)

    def _current_config(self) -> PPOConfig:
        """``config`` for the loss's own reading, not to be modified. It is rebuilt and validated only
        when a coefficient buffer changed since the last call (``_base_config`` changes reset it):
        a deep copy and validation per minibatch cost as much as the loss's own tensor work."""
        coefficients = {name: float(getattr(self, name)) for name in COEFFICIENTS}
        if self._config_cache is None or self._config_cache[0] != coefficients:
            cfg = self._base_config.model_copy(deep=True)
            _validated_update(cfg, coefficients, "MettaPPOLoss")
            self._config_cache = (coefficients, cfg)
        return self._config_cache[1]

    # --- keys ---------------------------------------------------------------------------------

    def set_keys(self, **kwargs: NestedKey | list[NestedKey]) -> None:
        """Point key names at other tensordict entries; forwarded to the value estimator.

        ``action`` and ``sample_log_prob`` also take TorchRL's list form with one key (a composite
        distribution with one head); more keys are refused (one log-prob per step)."""
        accepted = [f.name for f in fields(self._AcceptedKeys)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise MettaError(
                f"{type(self).__name__}.set_keys: unknown key name(s) {unknown}; accepted names are {accepted}"
            )
        for name in ("action", "sample_log_prob"):
            if name in kwargs:
                kwargs[name] = single_key(kwargs[name], name, f"{type(self).__name__}.set_keys")
        super().set_keys(**kwargs)

    def _forward_value_estimator_keys(self, **kwargs: Any) -> None:
        estimator = self._value_estimator
        if estimator is not None:
            keys = self.tensor_keys
            try:
                estimator.set_keys(
                    advantage=keys.advantage, value_target=keys.value_target, value=keys.value,
                    reward=keys.reward, done=keys.done, terminated=keys.terminated,
                    sample_log_prob=keys.sample_log_prob,
                )
            except KeyError as exc:
                raise MettaError(
                    f"{type(self).__name__}: the value estimator rejects the keys ({exc}); the critic must "
                    f"write the value key {keys.value!r}: build it with ValueOperator(..., out_keys=[{keys.value!r}])"
                ) from exc
        self._in_keys = None

    @property
    def in_keys(self) -> list[NestedKey]:
        """Entries of a full ``[B, T]`` batch the loss reads, as ``ClipPPOLoss`` lists them (TorchRL's
        keyword call accepts these, ``_`` joining nested names): the networks' inputs (the actor's
        also under ``"next"``, for TorchRL's estimators), ``action``, the behaviour log-prob and the
        ``"next"`` reward and flags. Optional entries (``value``, ``advantage``, ``priority_weight``)
        are not listed: without them the loss's estimator computes the advantage and the value."""
        if self._in_keys is None:
            keys = self.tensor_keys
            actor_in = self._actor_in_keys
            found = [*actor_in, *(_under_next(k) for k in actor_in), *self._critic_in_keys,
                     keys.action, keys.sample_log_prob,
                     *(_under_next(k) for k in (keys.reward, keys.done, keys.terminated))]
            self._in_keys = list(dict.fromkeys(unravel_key(k) for k in found))
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values: list[NestedKey]) -> None:
        self._in_keys = values

    @property
    def out_keys(self) -> list[str]:
        """Output entries (``select_out_keys`` narrows them, as for TorchRL's losses)."""
        if self._out_keys is None:
            self._out_keys = list(OUT_KEYS)
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values: list[str]) -> None:
        unknown = [k for k in values if k not in OUT_KEYS]
        if unknown:
            raise MettaError(f"{type(self).__name__}.out_keys: unknown output(s) {unknown}; outputs are {list(OUT_KEYS)}")
        self._out_keys = list(values)

    # --- value estimation ---------------------------------------------------------------------

    def make_value_estimator(self, value_type: Any = None, **hyperparams: Any) -> "MettaPPOLoss":
        """Choose the first-pass advantage estimator.

        - ``None`` / :class:`MettaAdvantage` (default): Metta's advantage with ``w = 1``.
          ``gamma``, ``gae_lambda``, ``rho_clip``, ``c_clip`` hyperparameters update the loss's
          config, so the first pass and the V-trace recompute use the same values.
        - ``ValueEstimators.TD0`` / ``TD1`` / ``GAE`` / ``TDLambda`` / ``VTrace`` / ``MAGAE``: TorchRL's estimator,
          with Metta's ``gamma``, ``gae_lambda`` and V-trace clips as defaults (``returns = A0 + value``).
        - a ``ValueEstimatorBase`` instance or subclass: used as given.
        """
        if value_type is None or value_type is MettaAdvantage:
            device = hyperparams.pop("device", None)
            unknown = sorted(set(hyperparams) - set(ESTIMATOR_CONFIG_FIELDS))
            if unknown:
                raise MettaError(
                    f"make_value_estimator(MettaAdvantage): unknown hyperparameter(s) {unknown}; "
                    f"accepted: {sorted(ESTIMATOR_CONFIG_FIELDS)} and device"
                )
            _validated_update(
                self._base_config, {ESTIMATOR_CONFIG_FIELDS[k]: v for k, v in hyperparams.items()},
                "make_value_estimator",
            )
            self._config_cache = None
            cfg = self._base_config
            self._value_estimator = MettaAdvantage(
                gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, rho_clip=cfg.vtrace.rho_clip,
                c_clip=cfg.vtrace.c_clip, value_network=self.critic_network,
                device=device if device is not None else self._default_device,
            )
            self.value_type = MettaAdvantage
        elif isinstance(value_type, ValueEstimatorBase) or (
            isinstance(value_type, type) and issubclass(value_type, ValueEstimatorBase)
        ):
            LossModule.make_value_estimator(self, value_type, **hyperparams)
        else:
            cfg = self._base_config
            defaults: dict[str, Any] = {"gamma": cfg.gamma}
            if value_type in (ValueEstimators.GAE, ValueEstimators.MAGAE, ValueEstimators.TDLambda):
                defaults["lmbda"] = cfg.gae_lambda
            if value_type == ValueEstimators.VTrace:
                defaults.update(rho_thresh=cfg.vtrace.rho_clip, c_thresh=cfg.vtrace.c_clip)
            check_estimator_hyperparams(hyperparams, f"make_value_estimator({value_type})")
            dispatch_value_estimator(
                self, value_type, supported=self.SUPPORTED_VALUE_ESTIMATORS, **{**defaults, **hyperparams}
            )
        self._forward_value_estimator_keys()
        return self

    def first_pass(self, tensordict: TensorDictBase) -> None:
        """Write the first-pass ``advantage`` (and ``value_target``) of a ``[B, T]`` batch in place.

        Runs the value estimator with the current critic parameters, detached. TorchRL's own
        estimators evaluate the critic on the root and ``"next"`` entries together and cannot
        take a value recorded at the root only, so they get a view without it and use their
        own critic values (TorchRL's semantics); the loss keeps reading the recorded values.
        With no recorded value, the estimator's (the critic's, detached) is written as the
        recorded one, as TorchRL's estimators do.
        """
        keys = self.tensor_keys
        params = self.critic_network_params.detach() if self._functional else None
        with set_recurrent_mode(True):  # [B, T] rows: a recurrent critic unrolls along time, as in forward
            if isinstance(self.value_estimator, MettaAdvantage):
                self.value_estimator(tensordict, params=params)
                return
            view = tensordict.exclude(keys.value)
            self.value_estimator(view, params=params)
        tensordict.set(keys.advantage, view.get(keys.advantage))
        tensordict.set(keys.value_target, view.get(keys.value_target))
        if tensordict.get(keys.value, None) is None:
            tensordict.set(keys.value, view.get(keys.value).detach())

    # --- forward ------------------------------------------------------------------------------

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """One minibatch of Metta PPO on a ``[B, T]`` tensordict; see the class docstring.

        Also callable with keyword tensors, as TorchRL's losses (``loss(observation=..., action=...,
        next_reward=...)``, names of ``in_keys`` joined by ``_``): returns the ``out_keys`` as a tuple.
        """
        who = type(self).__name__
        tensordict = as_rows(tensordict, who)  # TorchRL's agent groups folded into rows
        keys = self.tensor_keys
        td = tensordict  # read only: the networks get selections of their inputs
        if self._recurrent:  # stored states checked, zeroed at is_init (SPEC §6); the networks run in recurrent mode
            td = prepare_rows(td, self._recurrent, who)

        def read(key: NestedKey, field: str, configured: NestedKey | None = None) -> tuple[NestedKey, str, Tensor]:
            return key, field, read_bt(td, key, field=field, who=who, configured=configured, check_finite=False)

        # the step's own entries first: their shape and dtype errors come before any estimator runs
        entries = [read(("next", keys.reward), "reward", keys.reward), read(keys.sample_log_prob, "sample_log_prob")]
        if td.get(keys.advantage, None) is None:
            td = td.clone(False)  # the first pass writes advantage and value_target: not into the caller's
            self.first_pass(td)
        elif td.get(keys.value, None) is None:
            raise self._missing_value_error()
        entries += [read(keys.advantage, "advantage"), read(keys.value, "value")]
        prio = read(keys.priority_weight, "priority_weight") if td.get(keys.priority_weight, None) is not None else None
        next_terminated = read_bt(td, ("next", keys.terminated), field="terminated", who=who,
                                  configured=keys.terminated, float32=False, check_flags=False)
        # one reduction: float inputs finite, terminal flags 0/1, priority weights > 0
        check_values(entries, who, flags=(("next", keys.terminated), "terminated", next_terminated), positive=prio)
        next_reward, old_logprob, first_adv, values = (x for _, _, x in entries)
        prio_weights = prio[2] if prio is not None else None
        new_logprob, entropy, actor_td = self._policy_terms(td)
        new_values = self._new_values(td, actor_td)
        rewards, dones = metta_rewards_dones(next_reward, next_terminated)

        cfg = self._current_config()
        terms = ppo_minibatch_loss(
            cfg, old_logprob=old_logprob.detach(), new_logprob=new_logprob, entropy=entropy,
            new_values=new_values, values=values.detach(), rewards=rewards, dones=dones,
            advantages=first_adv.detach(), prio_weights=prio_weights,
        )
        self.phase_stats.track(terms.stats())
        ev = explained_variance(first_adv.detach(), values.detach())
        out = TensorDict(
            {
                "loss_objective": terms.policy_loss,
                "loss_critic": terms.value_term,
                "loss_entropy": terms.entropy_term,
                "entropy": terms.entropy.detach(),
                "kl_approx": terms.approx_kl,
                "clip_fraction": terms.clipfrac,
                "importance": terms.importance,
                "explained_variance": torch.tensor(ev),
                "policy_loss": terms.policy_loss.detach(),
                "value_loss": terms.value_loss.detach(),
                "approx_kl": terms.approx_kl,
                "clipfrac": terms.clipfrac,
                "current_logprobs": terms.current_logprobs,
            },
            batch_size=[],
        )
        self._clear_weakrefs(tensordict, out, "actor_network_params", "critic_network_params")
        return out

    def _missing_value_error(self) -> MissingEntryError:
        key = self.tensor_keys.value
        clip = self.clip_value
        start = f"clip_value is set to {clip}, but the key" if clip is not None else "the key"
        return MissingEntryError(
            f"{start} {key} was not found in the input tensordict. Make sure that the value key passed "
            f"to PPO exists in the input tensordict: Metta's loss reads the value recorded with the advantage "
            f"(its returns are advantage + value and the V-trace recompute bootstraps from it, SPEC §4.5) "
            f"whether or not the value is clipped; record it (e.g. the GAE that wrote the advantage writes it) "
            f"or drop {self.tensor_keys.advantage!r} so the loss's estimator computes both; if it is under another "
            f"name than {key!r}, map it with loss.set_keys(value=<your key>)"
        )

    def _require(self, td: TensorDictBase, module_keys: list[NestedKey], module: str) -> None:
        missing = [k for k in module_keys if td.get(k, None) is None]
        if missing:
            raise MettaError(
                f"{type(self).__name__}: the {module} network reads {missing}, missing from the input "
                f"tensordict (keys: {sorted(map(str, td.keys(True, True)))})"
            )

    def _policy_terms(self, td: TensorDictBase) -> tuple[Tensor, Tensor, TensorDictBase]:
        """``log pi(action | obs)`` and the entropy under the current parameters, ``[B, T]`` each, and
        the actor's working tensordict (its inputs plus what its modules wrote, e.g. a shared trunk's
        ``hidden``)."""
        who = type(self).__name__
        keys = self.tensor_keys
        in_keys = self._actor_in_keys
        self._require(td, in_keys, "actor")
        action = td.get(keys.action, None)
        if action is None:
            raise MettaError(
                f"{who}: the input tensordict has no {keys.action!r} entry (the 'action' key); "
                f"map it with loss.set_keys(action=<your key>)"
            )
        if action.requires_grad:
            raise MettaError(f"{who}: the stored action {keys.action!r} requires grad; detach it")
        actor_td = td.select(*in_keys)
        with blame_inputs(who, "the actor network", dict(actor_td.items(True, True)),
                          "give the actor the dtype (float32) and feature shape it was built for"):
            with self._parameters_of("actor"):
                dist = self.actor_network.get_dist(actor_td)
        composite = isinstance(dist, CompositeDistribution)
        with blame_inputs(who, "the actor's log_prob", {keys.action: action},
                          "actions must lie in the action space, one per step ([B, T] indices for a Categorical)"):
            log_prob = dist.log_prob(td.select(keys.action) if composite else action)
        try:
            entropy = dist.entropy()
        except NotImplementedError as exc:
            raise MettaError(
                f"{who}: the actor's distribution {_dist_name(dist)} has no analytic entropy(); Metta's loss "
                f"needs the analytic entropy (no Monte-Carlo estimate): use a distribution that implements it "
                f"(e.g. IndependentNormal instead of TanhNormal)"
            ) from exc
        log_prob = _one_head(log_prob, keys.sample_log_prob, "log_prob", who)
        entropy = _one_head(entropy, None, "entropy", who)
        bt = tuple(td.batch_size)
        for name, x in (("log_prob", log_prob), ("entropy", entropy)):
            if tuple(x.shape) != bt:
                raise MettaError(
                    f"{who}: the actor's {name} of action {self.tensor_keys.action!r} (shape {tuple(action.shape)}) "
                    f"has shape {tuple(x.shape)}, expected {bt} (one per step); check the action's shape, and for "
                    f"vector actions wrap the distribution in Independent(..., 1)"
                )
        return log_prob, entropy, actor_td

    def _new_values(self, td: TensorDictBase, actor_td: TensorDictBase) -> Tensor:
        """``V(o_t)`` under the current critic parameters, ``[B, T]``.

        The critic reads what the actor's modules wrote first (a shared trunk's output, with its
        gradient: TorchRL's ``ActorValueOperator`` pattern), then the input; with
        ``separate_losses`` its input is detached, so the critic loss does not reach a shared trunk."""
        in_keys = self._critic_in_keys
        from_actor = [k for k in in_keys if actor_td.get(k, None) is not None]
        critic_in = actor_td.select(*from_actor)
        if len(from_actor) < len(in_keys):
            rest = [k for k in in_keys if k not in from_actor]
            self._require(td, rest, "critic")
            critic_in.update(td.select(*rest))
        if self.separate_losses:
            critic_in = critic_in.detach()
        with blame_inputs(type(self).__name__, "the critic network", dict(critic_in.items(True, True)),
                          "give the critic the dtype (float32) and feature shape it was built for"):
            with self._parameters_of("critic"):
                out = self.critic_network(critic_in)
        key = self.tensor_keys.value
        if out.get(key, None) is None:
            raise MettaError(
                f"{type(self).__name__}: the critic writes {self.critic_network.out_keys}, not the value key "
                f"{key!r}; use loss.set_keys(value=<the critic's out key>)"
            )
        if isinstance(out.get(key), TensorDictBase):
            raise MettaError(
                f"{type(self).__name__}: the critic writes a tensordict of values under {key!r} "
                f"({sorted(map(str, out.get(key).keys(True, True)))}); Metta's critic loss takes one value per "
                f"step: use one value head"
            )
        return read_bt(out, key, field="value", who=f"{type(self).__name__} (critic output)")

    # --- stats and state ----------------------------------------------------------------------

    def zero_loss_tracker(self) -> None:
        """Clear the phase stats (the trainer does this when a training phase starts)."""
        self.phase_stats.clear()

    def stats(self) -> dict[str, float]:
        """Mean of each stat tracked in ``phase_stats`` since the last ``zero_loss_tracker``
        (SPEC §4.7; ``explained_variance`` when a sampler recorded it), plus ``anneal_beta``."""
        return {**self.phase_stats.means(), "anneal_beta": float(self.anneal_beta)}

    def target_kl_reached(self, mb_idx: int) -> bool:
        """SPEC §4.1 for this loss's ``target_kl`` (``PhaseStats.target_kl_reached``)."""
        return self.phase_stats.target_kl_reached(mb_idx, self._base_config.target_kl)

    def get_extra_state(self) -> dict[str, Any]:
        return {"config": self._base_config.model_dump(), "tracker": self.phase_stats.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        expected = {"config", "tracker"}
        if set(state) != expected:
            raise MettaError(
                f"{type(self).__name__}.load_state_dict: extra state has keys {sorted(state)}, expected "
                f"{sorted(expected)}; the checkpoint was not written by this loss"
            )
        self._base_config = PPOConfig.model_validate(state["config"])
        self._config_cache = None
        self.phase_stats.load_state_dict(state["tracker"])


TORCHRL_ONLY = {
    "loss_critic_type": "Metta's critic loss is 0.5 * max((V - R)^2, (V_clipped - R)^2) (SPEC §4.5); drop the "
                        "argument (TorchRL's 'l2' is twice it: critic_coeff scales the term)",
    "samples_mc_entropy": "Metta's entropy bonus is the distribution's analytic entropy, never a Monte-Carlo "
                          "estimate; drop the argument and use a distribution with entropy()",
    "entropy_bonus": "Metta's loss always has the entropy term; entropy_coeff=0 (ent_coef=0) turns it off",
}
"""``ClipPPOLoss`` arguments with no Metta meaning, and why (the error names the alternative)."""


def _refuse_torchrl_only(overrides: dict[str, Any], who: str) -> None:
    """Refuse TorchRL arguments Metta's semantics do not define, naming the reason and the alternative."""
    for name, reason in TORCHRL_ONLY.items():
        if name in overrides:
            raise MettaError(f"{who}: {name}={overrides[name]!r} is not supported: {reason}")
    for name in ("clip_epsilon", "clip_coef"):
        if isinstance(overrides.get(name), (tuple, list)):
            raise MettaError(
                f"{who}: {name}={overrides[name]!r}: Metta's policy clip is symmetric, one clip_coef "
                f"(SPEC §4.5); pass a float"
            )
    for name in ("entropy_coeff", "ent_coef"):
        if isinstance(overrides.get(name), Mapping):
            raise MettaError(
                f"{who}: {name} as a mapping per head: Metta's loss has one action head (one log-prob per "
                f"step), so one entropy coefficient; pass a float"
            )


def _validated_update(cfg: PPOConfig, updates: dict[str, Any], who: str) -> None:
    """``cfg.update(updates)`` with range errors reported as ``MettaError``."""
    try:
        cfg.update(updates)
    except ValidationError as exc:
        raise MettaError(f"{who}: invalid PPOConfig value(s) {updates}: {exc}") from exc


def _external_in_keys(module: TensorDictModule) -> list[NestedKey]:
    """``module.in_keys`` without the entries its own submodules write (a composite actor lists
    its ``"params"`` parent as an input): what the input tensordict must hold."""
    written = [unravel_key(k) for k in module.out_keys]
    written = [k if isinstance(k, tuple) else (k,) for k in written]

    def produced(key: NestedKey) -> bool:
        key = unravel_key(key)
        key = key if isinstance(key, tuple) else (key,)
        return any(w[: len(key)] == key for w in written)

    return [k for k in module.in_keys if not produced(k)]


def _under_next(key: NestedKey) -> NestedKey:
    return unravel_key(("next", key))


def _dist_name(dist: Any) -> str:
    if isinstance(dist, CompositeDistribution):
        return f"CompositeDistribution({', '.join(type(d).__name__ for d in dist.dists.values())})"
    return type(dist).__name__


def _one_head(x: Tensor | TensorDictBase, key: NestedKey | None, name: str, who: str) -> Tensor:
    """The one ``[B, T]`` tensor of a distribution's ``log_prob`` / ``entropy``: the tensor itself, or
    for a composite distribution the entry ``key`` (else its one leaf); several heads are refused."""
    if isinstance(x, Tensor):
        return x
    if key is not None and x.get(key, None) is not None:
        return x.get(key)
    leaves = list(x.items(True, True))
    if len(leaves) != 1:
        raise MettaError(
            f"{who}: the actor's composite distribution gives a {name} per head ({[k for k, _ in leaves]}); "
            f"Metta's loss takes one log-prob per step: use one head"
        )
    return leaves[0][1]
