"""The framework-neutral ``Loss`` lifecycle of the Metta trainer (SPEC §5).

Hooks, in trainer order: ``attach_context``, ``get_experience_spec``, ``on_new_training_run``,
``on_rollout_start``, ``rollout`` -> ``run_rollout``, ``train`` -> ``run_train``, ``on_mb_end``,
``on_train_phase_end``, ``save_loss_states``. Subclasses override the ``run_*`` hooks (no need
to call ``super()``) and may override the ``on_*`` hooks (call ``super()`` to keep the
base behaviour, e.g. the memory reset of ``on_rollout_start``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Any, Mapping

import torch
from tensordict import TensorDict
from torch import Tensor

from metta_core.config import LossSchedule
from metta_core.errors import MettaError
from metta_core.experience import Experience, ExperienceSpec
from metta_core.phase import PhaseStats
from metta_core.policy import Policy


class Loss:
    """Base class coordinating rollout and training behaviour for concrete losses.

    ``schedule`` decides in which trainer epochs ``train`` runs; outside it ``train`` returns a
    zero loss and requests no stop. Rollouts always run (a loss that stores experience must keep
    filling the buffer). ``phase_stats`` (``metta_core.phase.PhaseStats``) tracks the stats of the
    phase; ``loss_tracker`` (Metta's name) is its mapping of a stat name to the tracked values.
    """

    def __init__(
        self,
        policy: Policy,
        trainer_cfg: Any,
        env: Any,
        device: torch.device | str,
        instance_name: str,
        loss_config: Any,
    ) -> None:
        self.policy = policy
        self.trainer_cfg = trainer_cfg
        self.env = env
        self.device = torch.device(device)
        self.instance_name = instance_name
        self.loss_cfg = loss_config
        self.schedule: LossSchedule = getattr(loss_config, "schedule", None) or LossSchedule()
        self.replay: Experience | None = None
        self.phase_stats = PhaseStats()
        self.loss_tracker: defaultdict[str, list[float]] = self.phase_stats.values
        self._context: Any = None
        self._state_attrs: list[str] = []
        self.register_state_attr("loss_tracker")

    # -- context and buffer ---------------------------------------------------------------
    def attach_context(self, context: Any) -> None:
        """Register the shared trainer context for this loss instance."""
        self._context = context

    def _resolve_context(self, context: Any = None) -> Any:
        context = context if context is not None else self._context
        if context is None:
            raise MettaError(
                f"{type(self).__name__} {self.instance_name!r} has no trainer context; call "
                f"attach_context(context) or pass context= to the hook"
            )
        return context

    def get_experience_spec(self) -> ExperienceSpec:
        """Extra buffer fields this loss needs (none by default)."""
        return ExperienceSpec()

    def attach_replay_buffer(self, experience: Experience) -> None:
        """Attach the replay buffer (the rollout ``Experience``) to the loss."""
        self.replay = experience

    # -- lifecycle hooks ------------------------------------------------------------------
    def on_new_training_run(self, context: Any = None) -> None:
        """Called once at the very beginning of a training run."""
        self._context = self._resolve_context(context)

    def on_rollout_start(self, context: Any = None) -> None:
        """Called before each rollout phase: resets the policy's recurrent memory."""
        reset = getattr(self.policy, "reset_memory", None)
        if callable(reset):
            reset()

    def rollout(self, td: TensorDict, context: Any = None) -> None:
        """Rollout step executed while the experience buffer requests more data."""
        self.run_rollout(td, self._resolve_context(context))

    def run_rollout(self, td: TensorDict, context: Any) -> None:
        """Override to act and store experience; the base class does nothing."""

    def train(self, shared_loss_data: TensorDict, context: Any, mb_idx: int) -> tuple[Tensor, TensorDict, bool]:
        """Training step of minibatch ``mb_idx``: ``(loss, shared_loss_data, stop_phase)``."""
        context = self._resolve_context(context)
        if not self.schedule.is_active(context.epoch):
            return self._zero(), shared_loss_data, False
        return self.run_train(shared_loss_data, context, mb_idx)

    def run_train(self, shared_loss_data: TensorDict, context: Any, mb_idx: int) -> tuple[Tensor, TensorDict, bool]:
        """Override with the loss of one minibatch; the base class contributes zero."""
        return self._zero(), shared_loss_data, False

    def on_mb_end(self, context: Any, mb_idx: int) -> None:
        """Hook executed at the end of each minibatch."""

    def on_train_phase_end(self, context: Any = None) -> None:
        """Hook executed after the training phase completes."""

    def save_loss_states(self, context: Any = None) -> None:
        """Save loss states at the end of training (optional)."""

    # -- stats ----------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Mean of each tracked list over the phase."""
        return self.phase_stats.means()

    def zero_loss_tracker(self) -> None:
        """Clear all tracked values (the trainer does this when a phase starts)."""
        self.phase_stats.clear()

    # -- state ----------------------------------------------------------------------------
    def register_state_attr(self, *names: str) -> None:
        """Register attributes that are persisted by ``state_dict``/``load_state_dict``."""
        for name in names:
            if name not in self._state_attrs:
                self._state_attrs.append(name)

    def state_dict(self) -> OrderedDict[str, Any]:
        """A CPU snapshot of the registered attributes."""
        state: OrderedDict[str, Any] = OrderedDict()
        for name in self._state_attrs:
            value = getattr(self, name)
            if isinstance(value, Tensor):
                state[name] = value.detach().cpu().clone()
            elif isinstance(value, defaultdict):
                state[name] = {k: list(v) for k, v in value.items()}
            else:
                state[name] = copy.deepcopy(value)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> tuple[list[str], list[str]]:
        """Restore registered attributes; returns ``(missing_keys, unexpected_keys)``.

        With ``strict`` a mismatch raises an error listing both.
        """
        missing = [n for n in self._state_attrs if n not in state_dict]
        unexpected = [k for k in state_dict if k not in self._state_attrs]
        if strict and (missing or unexpected):
            raise MettaError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, unexpected keys "
                f"{unexpected}; pass strict=False to load the matching ones"
            )
        for name in self._state_attrs:
            if name not in state_dict:
                continue
            value = state_dict[name]
            current = getattr(self, name)
            if isinstance(current, Tensor):
                current.copy_(torch.as_tensor(value))
            elif isinstance(current, defaultdict):
                current.clear()
                current.update({k: list(v) for k, v in value.items()})
            else:
                setattr(self, name, copy.deepcopy(value))
        return missing, unexpected

    def _zero(self) -> Tensor:
        return torch.zeros((), device=self.device)
