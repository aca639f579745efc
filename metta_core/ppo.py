"""Metta's PPO loss on the ``Loss`` lifecycle (SPEC §4, §5).

The pure math lives in ``metta_core.ppo_math`` (import it from there); this module adds the
stateful part: rollout storage with burn-in, the first-pass advantages at ``mb_idx == 0``,
segment sampling, the target-KL stop and the tracked stats.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from tensordict import TensorDict

from metta_core.advantage import compute_advantage
from metta_core.config import PPOConfig, TrainerConfig
from metta_core.errors import MettaError
from metta_core.experience import Experience, ExperienceSpec, FieldSpec
from metta_core.loss import Loss
from metta_core.phase import MinibatchSchedule
from metta_core.policy import Policy
from metta_core.ppo_math import (
    approx_kl,
    clip_fraction,
    clipped_surrogate_pg_loss,
    clipped_value_loss,
    entropy_loss,
    ppo_minibatch_loss,
)

__all__ = ["PPO", "action_field"]


def action_field(action_space: gym.Space) -> FieldSpec:
    """Buffer field for one step's action: int64 for ``Discrete``, float32 for ``Box``."""
    if isinstance(action_space, gym.spaces.Discrete):
        return FieldSpec((), torch.long)
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        return FieldSpec(tuple(action_space.shape), torch.long)
    if isinstance(action_space, gym.spaces.Box):
        return FieldSpec(tuple(action_space.shape), torch.float32)
    raise MettaError(f"unsupported action space {action_space}; use Discrete, MultiDiscrete or Box")


class PPO(Loss):
    """PPO loss with prioritized segment replay and V-trace tweaks (Metta's ``PPO``).

    ``generator`` (a ``torch.Generator``) makes the segment sampling reproducible; without it
    the global RNG is used as ``torch.multinomial`` uses it.
    """

    def __init__(
        self,
        policy: Policy,
        trainer_cfg: TrainerConfig,
        env: Any,
        device: torch.device | str,
        instance_name: str = "ppo",
        loss_config: PPOConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(policy, trainer_cfg, env, device, instance_name, loss_config or PPOConfig())
        self.generator = generator
        self.minibatch_schedule: MinibatchSchedule | None = None  # built when the buffer is attached
        self.anneal_beta = 0.0
        self.burn_in_steps = int(getattr(policy, "burn_in_steps", 0))
        self.burn_in_steps_iter = 0
        self.register_state_attr("anneal_beta", "burn_in_steps_iter")

    def get_experience_spec(self) -> ExperienceSpec:
        scalar = FieldSpec((), torch.float32)
        return ExperienceSpec(
            {
                "actions": action_field(self.env.single_action_space),
                "act_log_prob": scalar,
                "values": scalar,
                "rewards": scalar,
                "dones": scalar,
                "truncateds": scalar,
            }
        )

    def attach_replay_buffer(self, experience: Experience) -> None:
        """Attach the buffer and build the minibatch schedule for its sizes (SPEC §4.2-4.3)."""
        super().attach_replay_buffer(experience)
        self.minibatch_schedule = MinibatchSchedule(
            minibatch_segments=experience.minibatch_segments,
            prio=self.loss_cfg.prioritized_experience_replay,
            total_timesteps=self.trainer_cfg.total_timesteps,
            batch_size=self.trainer_cfg.batch_size,
            generator=self.generator,
        )

    @property
    def advantages(self) -> torch.Tensor | None:
        """The first-pass advantages ``A0`` of the current update epoch (None before the first phase)."""
        return None if self.minibatch_schedule is None else self.minibatch_schedule.first_advantages

    def run_rollout(self, td: TensorDict, context: Any) -> None:
        with torch.no_grad():
            self.policy.forward(td)
        if self.burn_in_steps_iter < self.burn_in_steps:
            self.burn_in_steps_iter += 1
            return
        self.replay.store(td, context.training_env_id)

    def run_train(self, shared_loss_data: TensorDict, context: Any, mb_idx: int) -> tuple[torch.Tensor, TensorDict, bool]:
        """One minibatch of SPEC §4: steps 1-7."""
        cfg: PPOConfig = self.loss_cfg
        if self.replay is None:
            raise MettaError(f"PPO {self.instance_name!r}: no replay buffer; call attach_replay_buffer(experience)")
        reset = getattr(self.policy, "reset_memory", None)
        if callable(reset):
            reset()
        self.burn_in_steps_iter = 0

        stop = self.phase_stats.target_kl_reached(mb_idx, cfg.target_kl)
        buffer = self.replay.buffer
        schedule = self.minibatch_schedule
        if mb_idx == 0 or schedule.first_advantages is None:
            schedule.start_epoch(
                compute_advantage(
                    buffer["values"], buffer["rewards"], buffer["dones"], torch.ones_like(buffer["values"]),
                    gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, rho_clip=cfg.vtrace.rho_clip,
                    c_clip=cfg.vtrace.c_clip,
                ),
                context.epoch,
            )
            self.anneal_beta = schedule.beta
        idx, prio_weights = schedule.draw()
        minibatch = buffer[idx]
        shared_loss_data["sampled_mb"] = minibatch
        shared_loss_data["indices"] = idx

        # whole [mb, horizon] rows: a recurrent policy unrolls them (SPEC §6), others flatten
        policy_td = minibatch.select(*self.policy.get_agent_experience_spec().fields).clone()
        policy_td = self.policy.forward(policy_td, action=minibatch["actions"])
        shape = minibatch.batch_size
        terms = ppo_minibatch_loss(
            cfg,
            old_logprob=minibatch["act_log_prob"],
            new_logprob=policy_td["act_log_prob"].reshape(shape),
            entropy=policy_td["entropy"].reshape(shape),
            new_values=policy_td["values"].reshape(shape),
            values=minibatch["values"],
            rewards=minibatch["rewards"],
            dones=minibatch["dones"],
            advantages=self.advantages[idx],
            prio_weights=prio_weights,
        )
        shared_loss_data["policy_td"] = policy_td.reshape(shape)
        self.phase_stats.track(terms.stats())
        return terms.loss, shared_loss_data, stop

    def on_train_phase_end(self, context: Any = None) -> None:
        """Track ``explained_variance = 1 - var(A0) / var(A0 + values)`` over the whole buffer."""
        if self.advantages is not None and self.replay is not None:
            self.phase_stats.record_explained_variance(self.advantages, self.replay.buffer["values"])

    # -- Metta's seed entry point (a thin layer over metta_core.ppo_math) -------------------
    def compute_ppo_losses(
        self,
        minibatch: TensorDict,
        new_logprob: torch.Tensor,
        entropy: torch.Tensor,
        newvalue: torch.Tensor,
        importance_sampling_ratio: torch.Tensor,
        adv: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Metta's ``PPO.compute_ppo_losses``: ``(pg_loss, v_loss, entropy_loss, approx_kl, clipfrac)``.

        ``adv`` is the final advantage (V-trace recomputed, normalized, priority-weighted),
        ``minibatch`` holds ``act_log_prob``, ``values`` and ``returns`` (``A0 + values``) of the
        rows; the terms are the SPEC §4.6 means (``ppo_minibatch_loss`` computes the same ones).
        """
        cfg: PPOConfig = self.loss_cfg
        missing = [k for k in ("act_log_prob", "values", "returns") if k not in minibatch.keys()]
        if missing:
            raise MettaError(
                f"compute_ppo_losses: minibatch has no {missing}; it needs act_log_prob and values (stored at "
                f"rollout) and returns = first-pass advantages + values of the sampled rows"
            )
        ratio = importance_sampling_ratio
        returns = minibatch["returns"]
        pg_loss = clipped_surrogate_pg_loss(ratio, adv, clip_coef=cfg.clip_coef)
        v_loss = clipped_value_loss(newvalue.view(returns.shape), minibatch["values"], returns,
                                    vf_clip_coef=cfg.vf_clip_coef, clip_vloss=cfg.clip_vloss)
        mean_entropy = -entropy_loss(entropy)
        kl = approx_kl(new_logprob.view(ratio.shape), minibatch["act_log_prob"], ratio)
        clipfrac = clip_fraction(ratio, clip_coef=cfg.clip_coef)
        return pg_loss, v_loss, mean_entropy, kl, clipfrac
