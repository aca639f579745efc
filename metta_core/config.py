"""Typed configuration with Metta's field names, defaults and validation ranges (SPEC §4).

Every config is a pydantic model that forbids unknown fields, so a typo such as
``PPOConfig(clip_cof=0.2)`` fails with an error naming ``clip_cof``. ``override`` and
``update`` accept dotted paths (``cfg.override("vtrace.rho_clip", 0.8)``) and validate again.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from metta_core.errors import MettaError, require_positive_ints


ADAM_EPS = 1e-12
"""Epsilon of Metta's Adam optimizer (betas 0.9, 0.999); every framework's trainer uses it."""


class Config(BaseModel):
    """Base for all metta_core configs: strict fields, validated assignment, dotted overrides."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def override(self, key: str, value: Any) -> "Config":
        """Set ``key`` (a dotted path such as ``"vtrace.rho_clip"``) to ``value`` in place."""
        return self.update({key: value})

    def update(self, updates: Mapping[str, Any]) -> "Config":
        """Set several dotted paths at once: ``cfg.update({"gamma": 0.99, "vtrace.c_clip": 2.0})``.

        Every path is checked first (a ``MettaError`` names an unknown one); the result is then
        validated as a whole, so fields that constrain each other can be given as separate paths
        (``{"schedule.cycle_length": 2, "schedule.active_in_cycle": [2]}``). On a validation error
        (pydantic's ``ValidationError``) ``self`` is unchanged."""
        data = self.model_dump()
        for key, value in updates.items():
            *parents, leaf = key.split(".")
            node, owner = data, type(self)
            for i, name in enumerate(parents):
                field = owner.model_fields.get(name)
                nested = field.annotation if field is not None else None
                if not (isinstance(nested, type) and issubclass(nested, Config)):
                    raise MettaError(
                        f"override({key!r}): {'.'.join(parents[: i + 1])!r} is not a nested config of "
                        f"{type(self).__name__}; fields are {sorted(owner.model_fields)}"
                    )
                node, owner = node[name], nested
            if leaf not in owner.model_fields:
                raise MettaError(
                    f"override({key!r}): {owner.__name__} has no field {leaf!r}; "
                    f"fields are {sorted(owner.model_fields)}"
                )
            node[leaf] = value
        validated = type(self).model_validate(data)
        for name in type(self).model_fields:
            setattr(self, name, getattr(validated, name))
        return self


class VTraceConfig(Config):
    """Truncation levels of the V-trace importance weights in the advantage (SPEC §2)."""

    rho_clip: float = Field(default=1.0, gt=0, description="Clip of the ratio on the TD error.")
    c_clip: float = Field(default=1.0, gt=0, description="Clip of the ratio on the trace.")


class PrioritizedExperienceReplayConfig(Config):
    """Segment sampling by advantage magnitude (SPEC §4.2-4.3)."""

    prio_alpha: float = Field(
        default=0.0, ge=0, le=1, description="Priority exponent; 0 samples segments uniformly."
    )
    prio_beta0: float = Field(
        default=0.6, ge=0, le=1, description="Initial importance-weight exponent, annealed to 1."
    )


class LossSchedule(Config):
    """When a loss trains (SPEC §5): ``start_epoch <= epoch < end_epoch`` and, if
    ``cycle_length`` is set, ``(epoch % cycle_length) + 1`` in ``active_in_cycle``."""

    start_epoch: int = Field(default=0, ge=0, description="First trainer epoch that trains.")
    end_epoch: int | None = Field(default=None, description="Epoch at which training stops (exclusive).")
    cycle_length: int | None = Field(default=None, gt=0, description="Length of a training cycle.")
    active_in_cycle: list[int] | None = Field(
        default=None, description="1-indexed positions in the cycle where the loss trains."
    )

    @model_validator(mode="after")
    def _check_cycle(self) -> "LossSchedule":
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")
        if (self.cycle_length is None) != (self.active_in_cycle is None):
            raise ValueError("cycle_length and active_in_cycle must be set together")
        if self.cycle_length is not None:
            bad = [p for p in self.active_in_cycle or [] if not 1 <= p <= self.cycle_length]
            if bad:
                raise ValueError(
                    f"active_in_cycle positions {bad} are outside 1..cycle_length ({self.cycle_length})"
                )
        return self

    def is_active(self, epoch: int) -> bool:
        """Whether a loss with this schedule trains at trainer epoch ``epoch``."""
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return False
        if self.cycle_length is None:
            return True
        return (epoch % self.cycle_length) + 1 in (self.active_in_cycle or [])


class PPOConfig(Config):
    """Metta's PPO loss settings; names and defaults as in ``metta.rl.loss.ppo.PPOConfig``."""

    clip_coef: float = Field(default=0.264407, gt=0, le=1, description="Policy ratio clip epsilon.")
    ent_coef: float = Field(default=0.01, ge=0, description="Weight of the entropy bonus.")
    gae_lambda: float = Field(default=0.891477, ge=0, le=1, description="GAE lambda.")
    gamma: float = Field(default=0.977, ge=0, le=1, description="Discount factor.")
    max_grad_norm: float = Field(default=0.5, ge=0, description="Global gradient-norm clip.")
    vf_clip_coef: float = Field(default=0.1, ge=0, description="Value clip around the stored value.")
    vf_coef: float = Field(default=0.897619, ge=0, description="Weight of the value loss.")
    l2_reg_loss_coef: float = Field(default=0.0, ge=0, description="Accepted and unused, as in Metta.")
    l2_init_loss_coef: float = Field(default=0.0, ge=0, description="Accepted and unused, as in Metta.")
    norm_adv: bool = Field(default=True, description="Normalize advantages per minibatch (SPEC §3).")
    clip_vloss: bool = Field(default=True, description="Use the clipped value loss.")
    target_kl: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Stop the phase when mean approx_kl exceeds it (> 0; None: never)."
    )
    vtrace: VTraceConfig = Field(default_factory=VTraceConfig, description="V-trace clips.")
    prioritized_experience_replay: PrioritizedExperienceReplayConfig = Field(
        default_factory=PrioritizedExperienceReplayConfig, description="Segment prioritization."
    )
    schedule: LossSchedule = Field(default_factory=LossSchedule, description="When this loss trains.")

    def create(self, policy: Any, trainer_cfg: Any, env: Any, device: Any, instance_name: str, loss_config: Any = None) -> Any:
        """Metta's ``PPOConfig.create``: the ``metta_core.ppo.PPO`` loss with ``loss_config`` (this config if None)."""
        from metta_core.ppo import PPO  # ppo imports this module

        return PPO(policy, trainer_cfg, env, device, instance_name, self if loss_config is None else loss_config)


class TrainerConfig(Config):
    """Buffer and phase sizes (SPEC §4). Derived sizes are properties, checked at construction."""

    batch_size: int = Field(default=524288, gt=0, description="Env steps per rollout phase.")
    bptt_horizon: int = Field(default=64, gt=0, description="Steps per buffer row (segment).")
    minibatch_size: int = Field(default=16384, gt=0, description="Env steps per minibatch.")
    max_minibatch_size: int = Field(default=32768, gt=0, description="Largest minibatch run at once.")
    update_epochs: int = Field(default=1, gt=0, description="Passes over the buffer per phase.")
    total_timesteps: int = Field(default=50_000_000_000, gt=0, description="Training budget in env steps.")

    @model_validator(mode="after")
    def _check_sizes(self) -> "TrainerConfig":
        self.sizes  # raises MettaError (a ValueError: pydantic reports it) naming the numbers when they do not divide
        return self

    @property
    def sizes(self) -> dict[str, int]:
        """``segments, minibatch_size, accumulate_minibatches, minibatch_segments, num_minibatches``."""
        return buffer_sizes(self.batch_size, self.bptt_horizon, self.minibatch_size, self.max_minibatch_size)


def buffer_sizes(
    batch_size: int, bptt_horizon: int, minibatch_size: int, max_minibatch_size: int
) -> dict[str, int]:
    """Metta's buffer arithmetic (SPEC §4); raises ``MettaError`` naming the numbers and the fix.

    ``accumulate_minibatches`` uses the requested ``minibatch_size`` (before the cap), as Metta's
    ``Experience`` does.
    """
    require_positive_ints("buffer_sizes", batch_size=batch_size, bptt_horizon=bptt_horizon,
                          minibatch_size=minibatch_size, max_minibatch_size=max_minibatch_size)
    segments = batch_size // bptt_horizon
    if segments < 1:
        raise MettaError(
            f"batch_size ({batch_size}) is smaller than bptt_horizon ({bptt_horizon}); "
            f"set batch_size to a multiple of bptt_horizon"
        )
    effective = min(minibatch_size, max_minibatch_size)
    if effective % bptt_horizon:
        raise MettaError(
            f"minibatch_size ({effective}) must be divisible by bptt_horizon ({bptt_horizon}): "
            f"minibatch_segments = {effective}/{bptt_horizon} = {effective / bptt_horizon:g} is not whole; "
            f"use a minibatch_size that is a multiple of {bptt_horizon}"
        )
    mb_segments = effective // bptt_horizon
    if segments % mb_segments:
        raise MettaError(
            f"segments ({segments} = batch_size {batch_size} // bptt_horizon {bptt_horizon}) must be "
            f"divisible by minibatch_segments ({mb_segments}): num_minibatches = {segments / mb_segments:g} "
            f"is not whole; make batch_size a multiple of minibatch_size ({effective})"
        )
    return {
        "segments": segments,
        "minibatch_size": effective,
        "accumulate_minibatches": max(1, minibatch_size // max_minibatch_size),
        "minibatch_segments": mb_segments,
        "num_minibatches": segments // mb_segments,
    }


__all__ = [
    "Config",
    "VTraceConfig",
    "PrioritizedExperienceReplayConfig",
    "LossSchedule",
    "PPOConfig",
    "TrainerConfig",
    "buffer_sizes",
    "ADAM_EPS",
    "MettaError",
]
