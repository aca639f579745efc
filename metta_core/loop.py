"""The core training loop of the Metta trainer: rollout phase, training phase (SPEC §4, §5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from tensordict import TensorDict

from metta_core.errors import MettaError
from metta_core.experience import Experience
from metta_core.loss import Loss
from metta_core.phase import PhaseSizes, clip_and_step, run_phase
from metta_core.ppo import action_field


@dataclass
class ComponentContext:
    """State shared by the trainer and its losses.

    ``epoch`` is the trainer's epoch counter (one rollout + one training phase), ``agent_step``
    the env steps collected so far, ``training_env_id`` the slice of agents of the current step.
    """

    policy: Any
    experience: Experience
    optimizer: torch.optim.Optimizer
    config: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    epoch: int = 0
    agent_step: int = 0
    training_env_id: slice = field(default_factory=lambda: slice(0, 0))
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutResult:
    """Results from a rollout phase."""

    agent_steps: int
    episode_returns: list[float]
    episode_lengths: list[int]


class CoreTrainingLoop:
    """Handles the core training loop with rollout and training phases."""

    def __init__(
        self,
        policy: Any,
        experience: Experience,
        losses: Mapping[str, Loss],
        optimizer: torch.optim.Optimizer,
        device: torch.device | str,
        context: ComponentContext,
    ) -> None:
        if not losses:
            raise MettaError("CoreTrainingLoop needs at least one loss, got an empty mapping")
        self.policy = policy
        self.experience = experience
        self.losses = dict(losses)
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.context = context
        self.accumulate_minibatches = experience.accumulate_minibatches
        self.last_action: torch.Tensor | None = None
        self._env_id_range: torch.Tensor | None = None
        for loss in self.losses.values():
            loss.attach_context(context)
            loss.attach_replay_buffer(experience)

    def on_epoch_start(self, context: ComponentContext) -> None:
        """Called at the start of each epoch: prepares the buffer and the losses for a rollout."""
        self.experience.reset_for_rollout()
        for loss in self.losses.values():
            loss.on_rollout_start(context)

    def rollout_phase(self, env: Any, context: ComponentContext) -> RolloutResult:
        """Step ``env`` until every buffer row is full; each step goes through every loss's rollout.

        ``env`` follows ``metta_core.gym_env.TrainingEnvironment``: ``get_observations()`` returns
        ``(obs, rewards, dones, truncateds, training_env_id)`` where rewards/dones belong to the
        transition that led into ``obs`` (SPEC §1), and ``send_actions(actions)`` steps.
        """
        steps = 0
        returns: list[float] = []
        lengths: list[int] = []
        while not self.experience.ready_for_training:
            obs, rewards, dones, truncateds, env_id = env.get_observations()
            n = len(range(*env_id.indices(env.num_agents)))
            td = TensorDict(
                {
                    "env_obs": torch.as_tensor(obs, device=self.device),
                    "rewards": torch.as_tensor(rewards, dtype=torch.float32, device=self.device),
                    "dones": torch.as_tensor(dones, dtype=torch.float32, device=self.device),
                    "truncateds": torch.as_tensor(truncateds, dtype=torch.float32, device=self.device),
                },
                batch_size=[n],
                device=self.device,
            )
            context.training_env_id = env_id
            td["training_env_ids"] = self._env_ids(env)[env_id]
            self.add_last_action_to_td(td, env)
            for loss in self.losses.values():
                loss.rollout(td, context)
            if "actions" not in td.keys():
                raise MettaError("no loss wrote 'actions' during rollout; the policy forward must set td['actions']")
            self.last_action[td["training_env_ids"]] = td["actions"].detach().to(self.last_action.dtype)
            env.send_actions(td["actions"].cpu().numpy())
            steps += n
            finished = env.pop_finished_episodes()
            returns += finished[0]
            lengths += finished[1]
        return RolloutResult(steps, returns, lengths)

    # -- per-agent previous action (Metta's ``last_actions``) ---------------------------------
    def _env_ids(self, env: Any) -> torch.Tensor:
        if self._env_id_range is None or len(self._env_id_range) != env.num_agents:
            self._env_id_range = torch.arange(env.num_agents, device=self.device)
        return self._env_id_range

    def add_last_action_to_td(self, td: TensorDict, env: Any) -> None:
        """Write ``td["last_actions"]``: each agent's previous action, indexed by ``td["training_env_ids"]``.

        As in Metta's loop, the per-agent actions start at zero when the run starts (shape and dtype
        of ``metta_core.ppo.action_field``), are overwritten with each step's actions after the
        losses' rollout, and are *not* zeroed at episode boundaries or rollout starts: the first step
        of an episode sees the action that ended the previous one (``dones``/``truncateds`` tell a
        policy that wants otherwise). The buffer stores it when a spec declares ``last_actions``.
        """
        if self.last_action is None:
            spec = action_field(env.single_action_space)
            self.last_action = torch.zeros(env.num_agents, *spec.shape, dtype=spec.dtype, device=self.device)
        td["last_actions"] = self.last_action[td["training_env_ids"]]

    def training_phase(
        self, context: ComponentContext, update_epochs: int, max_grad_norm: float = 0.5
    ) -> tuple[dict[str, float], int]:
        """Train on the filled buffer (SPEC §4): returns ``(loss stats, update epochs trained)``.

        ``metta_core.phase.run_phase`` drives it: the losses' minibatch losses are summed;
        gradients are zeroed at the start of each group of ``accumulate_minibatches`` minibatches
        and, at its end, clipped to ``max_grad_norm`` and applied. A loss requesting a stop
        (target KL) ends the whole phase before that minibatch's backward pass.
        """
        for loss in self.losses.values():
            loss.zero_loss_tracker()

        def minibatch(_epoch: int, mb_idx: int) -> tuple[torch.Tensor, bool]:
            total_loss = torch.zeros((), device=self.device)
            shared_loss_data = TensorDict({}, batch_size=[])
            stop = False
            for loss in self.losses.values():
                value, shared_loss_data, wants_stop = loss.train(shared_loss_data, context, mb_idx)
                total_loss = total_loss + value
                stop = stop or wants_stop
            return total_loss, stop

        def on_minibatch_end(mb_idx: int) -> None:
            for loss in self.losses.values():
                loss.on_mb_end(context, mb_idx)

        sizes = PhaseSizes(
            update_epochs=update_epochs,
            num_minibatches=self.experience.num_minibatches,
            minibatch_segments=self.experience.minibatch_segments,
            accumulate_minibatches=self.accumulate_minibatches,
        )
        epochs_trained = run_phase(
            sizes, minibatch, zero_grad=self.optimizer.zero_grad,
            step=clip_and_step(self.policy.parameters(), [self.optimizer], max_grad_norm),
            on_minibatch_end=on_minibatch_end,
        )
        for loss in self.losses.values():
            loss.on_train_phase_end(context)
        stats: dict[str, float] = {}
        for loss in self.losses.values():
            stats.update(loss.stats())
        return stats, epochs_trained
