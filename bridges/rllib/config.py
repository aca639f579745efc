"""``metta_ppo_config``: an RLlib ``PPOConfig`` that trains with Metta's PPO (SPEC §4).

Metta's settings are validated by ``metta_core.config`` and stored once, in
``config.learner_config_dict["metta"]``. Where RLlib has a field of the same meaning it is set to
the same value, and ``metta_settings`` refuses a config whose copies disagree (so a later
``config.training(clip_param=...)`` cannot silently diverge from what the learner uses).

=============================  ===============================  ==================================
Metta field                    RLlib ``PPOConfig`` field        note
=============================  ===============================  ==================================
``clip_coef``                  ``clip_param``                   same meaning
``ent_coef``                   ``entropy_coeff``                same meaning (no schedule)
``gae_lambda``                 ``lambda_``                      same meaning
``gamma``                      ``gamma``                        same meaning
``max_grad_norm``              ``grad_clip`` (``global_norm``)  Metta: ``clip_grad_norm_``
``vf_coef``                    ``vf_loss_coeff``                same meaning
``vf_clip_coef``               (none)                           Metta clips the value *change*;
                                                                RLlib's ``vf_clip_param`` clips
                                                                the squared error: not used
``target_kl``                  (none)                           Metta's early stop (SPEC §4.1);
                                                                RLlib's ``kl_target`` drives an
                                                                adaptive KL loss, switched off
                                                                (``use_kl_loss=False``)
``norm_adv``, ``clip_vloss``,  (none)                           ``learner_config_dict["metta"]``
``vtrace.*``, ``prioritized_
experience_replay.*``,
``l2_*_loss_coef``
``schedule``                   (none)                           refused: ``MettaPPOLearner`` trains
                                                                every iteration (no SPEC §5 schedule)
``batch_size``                 ``train_batch_size_per_learner`` env steps per learner and update
``minibatch_size``             ``minibatch_size``               env steps per minibatch
``update_epochs``              ``num_epochs``                   passes per update
``bptt_horizon``               ``model_config["max_seq_len"]``  columns of a row; a stateful module
                                                                must have max_seq_len == it
``max_minibatch_size``,        (none)                           accumulation; beta annealing
``total_timesteps``
=============================  ===============================  ==================================

RLlib settings fixed here: ``use_kl_loss=False``, ``shuffle_batch_per_epoch=False`` (Metta samples
whole segments), ``add_default_connectors_to_learner_pipeline=False`` (``MettaLayoutConnector`` is
the learner pipeline), ``learner_class=MettaPPOLearner``. The learning rate stays RLlib's
``lr`` (``config.training(lr=...)``). With several agents per episode the batch sizes count agent-steps,
one buffer row per agent: ``config.multi_agent(count_steps_by="agent_steps")`` is required
(``"env_steps"`` is refused by ``MettaLayoutConnector`` when it sees such an episode).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError
from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig

from metta_core.config import LossSchedule, PPOConfig, TrainerConfig
from metta_core.errors import MettaError

METTA_KEY = "metta"
"""Key of Metta's settings in ``AlgorithmConfig.learner_config_dict``."""

TRAINER_DEFAULTS = {"batch_size": 4096, "bptt_horizon": 64, "minibatch_size": 1024, "update_epochs": 1}
"""Trainer sizes used when not given (Metta's own defaults are sized for 500k-step batches)."""

_OVERLAP = (
    ("clip_coef", "clip_param"),
    ("ent_coef", "entropy_coeff"),
    ("gae_lambda", "lambda_"),
    ("gamma", "gamma"),
    ("max_grad_norm", "grad_clip"),
    ("vf_coef", "vf_loss_coeff"),
)
_TRAINER_OVERLAP = (
    ("batch_size", "train_batch_size_per_learner"),
    ("minibatch_size", "minibatch_size"),
    ("update_epochs", "num_epochs"),
)


def _validated(kind: str, build):
    try:
        return build()
    except ValidationError as exc:
        raise MettaError(f"metta_ppo_config: invalid {kind} setting(s): {exc}") from None


def metta_ppo_config(env: Any = None, **metta_fields: Any) -> RLlibPPOConfig:
    """An RLlib ``PPOConfig`` wired to ``MettaPPOLearner`` with Metta's settings.

    ``metta_fields`` are Metta ``PPOConfig`` fields (nested ones as dotted keys,
    ``**{"vtrace.rho_clip": 0.8}``, or as dicts, ``vtrace={"rho_clip": 0.8}``) and ``TrainerConfig``
    fields (``batch_size``, ``bptt_horizon``, ``minibatch_size``, ``max_minibatch_size``,
    ``update_epochs``, ``total_timesteps``). Unknown names and out-of-range values raise
    ``MettaError``. See the module docstring for the mapping onto RLlib's fields.
    """
    from bridges.rllib.learner import MettaPPOLearner

    fields = dict(metta_fields)
    trainer_kw = {**TRAINER_DEFAULTS, **{k: fields.pop(k) for k in list(fields) if k in TrainerConfig.model_fields}}
    dotted = {k: fields.pop(k) for k in list(fields) if "." in k}
    ppo = _validated("PPOConfig", lambda: PPOConfig(**fields).update(dotted))
    _refuse_schedule(ppo)
    trainer = _validated("TrainerConfig", lambda: TrainerConfig(**trainer_kw))
    config = RLlibPPOConfig()
    if env is not None:
        config.environment(env)
    config.training(
        **{rllib: getattr(ppo, metta) for metta, rllib in _OVERLAP},
        **{rllib: getattr(trainer, metta) for metta, rllib in _TRAINER_OVERLAP},
        grad_clip_by="global_norm",
        use_kl_loss=False,
        kl_coeff=0.0,
        use_critic=True,
        use_gae=True,
        shuffle_batch_per_epoch=False,
    )
    config.rl_module(model_config={"max_seq_len": trainer.bptt_horizon})  # a stateful module's rows (SPEC §6)
    config.learners(
        learner_class=MettaPPOLearner,
        add_default_connectors_to_learner_pipeline=False,
        learner_config_dict={
            METTA_KEY: {
                "ppo": ppo.model_dump(),
                "bptt_horizon": trainer.bptt_horizon,
                "max_minibatch_size": trainer.max_minibatch_size,
                "total_timesteps": trainer.total_timesteps,
            }
        },
    )
    return config


def _refuse_schedule(ppo: PPOConfig) -> None:
    """``PPOConfig.schedule`` (SPEC §5) is not implemented by ``MettaPPOLearner``: refused, not ignored."""
    if ppo.schedule != LossSchedule():
        raise MettaError(
            f"PPOConfig.schedule ({ppo.schedule.model_dump(exclude_defaults=True)}): MettaPPOLearner trains at every "
            f"iteration and does not read a loss schedule; leave schedule at its default, or train with the core or "
            f"TorchRL (metta-bridges train --framework core|torchrl), which honour it"
        )


def _refuse_unsupported(config) -> None:
    """RLlib PPO features Metta's PPO does not have, refused rather than ignored (SPEC §4)."""
    if isinstance(config.entropy_coeff, (list, tuple)):
        raise MettaError(
            f"config.entropy_coeff is a schedule ({config.entropy_coeff}); Metta's PPO has a constant ent_coef "
            f"(no entropy schedule): set metta_ppo_config(ent_coef=...)"
        )
    if config.use_kl_loss or config.kl_coeff:
        raise MettaError(
            f"config.use_kl_loss={config.use_kl_loss}, kl_coeff={config.kl_coeff}: Metta's PPO has no KL penalty "
            f"(its target_kl stops the phase early instead); leave use_kl_loss=False and kl_coeff=0 and set "
            f"metta_ppo_config(target_kl=...)"
        )
    if config.grad_clip_by != "global_norm":
        raise MettaError(
            f"config.grad_clip_by is {config.grad_clip_by!r}; MettaPPOLearner clips the global norm of the module's "
            f"gradients at max_grad_norm (SPEC §4.8), grad_clip_by='global_norm'; per-tensor 'norm' or 'value' "
            f"clipping is not Metta's PPO"
        )


def require_agent_step_counting(count_steps_by: str, agents: int) -> None:
    """Refuse env-step counting once an episode has several agents: Metta's ``batch_size`` and
    ``minibatch_size`` count agent-steps (one buffer row per agent), so with ``"env_steps"`` the
    sampled batch would hold ``agents`` times the rows the phase's sizes say.

    Checked where episodes become rows (``MettaLayoutConnector``), not when a learner is built: a
    learner with several modules is fine until a multi-agent env feeds it (RLlib's own
    ``add_module`` / ``from_checkpoint`` round trip builds exactly such a learner).
    """
    if agents > 1 and count_steps_by != "agent_steps":
        raise MettaError(
            f"config.count_steps_by is {count_steps_by!r} and an episode has {agents} agents; Metta's batch_size "
            f"and minibatch_size count agent-steps (one buffer row per agent): set "
            f"config.multi_agent(count_steps_by='agent_steps')"
        )


def metta_settings(config) -> tuple[PPOConfig, TrainerConfig]:
    """Metta's ``(PPOConfig, TrainerConfig)`` of an ``AlgorithmConfig`` built by ``metta_ppo_config``.

    Raises ``MettaError`` if the settings are missing or if an RLlib field listed in the mapping
    table was changed without its Metta twin.
    """
    stored = (config.learner_config_dict or {}).get(METTA_KEY)
    if stored is None:
        raise MettaError(
            f"config.learner_config_dict has no {METTA_KEY!r} entry; build the config with "
            f"bridges.rllib.metta_ppo_config(...) so the Metta PPO settings are known"
        )
    ppo = _validated("PPOConfig", lambda: PPOConfig.model_validate(stored["ppo"]))
    _refuse_schedule(ppo)
    _refuse_unsupported(config)
    lr = config.lr
    if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr > 0):
        raise MettaError(f"config.lr must be a finite learning rate > 0, got {lr!r}; set config.training(lr=...)")
    for metta, rllib in _OVERLAP:
        if getattr(config, rllib) != getattr(ppo, metta):
            raise MettaError(
                f"config.{rllib} ({getattr(config, rllib)}) differs from Metta's {metta} ({getattr(ppo, metta)}); "
                f"set Metta fields through metta_ppo_config({metta}=...) so both copies agree"
            )
    trainer = _validated(
        "TrainerConfig",
        lambda: TrainerConfig(
            batch_size=config.train_batch_size_per_learner,
            minibatch_size=config.minibatch_size,
            update_epochs=config.num_epochs,
            bptt_horizon=stored["bptt_horizon"],
            max_minibatch_size=stored["max_minibatch_size"],
            total_timesteps=stored["total_timesteps"],
        ),
    )
    return ppo, trainer
