"""Metta's prioritized segment sampling for a collected TorchRL ``[B, T]`` batch (SPEC §4.2-4.3)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from tensordict import TensorDictBase

from metta_core.errors import MettaError
from metta_core.ppo_math import anneal_beta, explained_variance, prioritized_sample

from bridges.torchrl.layout import check_batch_time, read_bt
from bridges.torchrl.loss import MettaPPOLoss


class MettaSegmentSampler:
    """Yield ``[minibatch_segments, T]`` minibatches of whole rows with ``priority_weight`` set.

    One training phase on a collected batch of ``B`` rows (segments) of ``T`` steps::

        beta = anneal_beta(epoch, total_timesteps, B * T, prio_alpha, prio_beta0)   # SPEC §4.2
        for e in range(update_epochs):
            A0 = batch[advantage] if present, else loss.first_pass(batch)   # whole batch, w = 1
            for mb_idx in range(B // minibatch_segments):
                idx, prio_w = prioritized_sample(A0, minibatch_segments, prio_alpha, beta, generator)
                yield mb_idx, batch[idx] with advantage = A0[idx], priority_weight = prio_w  # SPEC §4.3

    Each minibatch is drawn independently (rows are unique within one minibatch, not across).
    Starting a phase clears the loss's stat tracker and stores ``beta`` in ``loss.anneal_beta``;
    each first pass records ``explained_variance(A0, values)`` of the whole batch on the loss.
    With a seeded ``generator`` the draws are reproducible; ``state_dict`` holds its state.
    """

    def __init__(
        self,
        loss: MettaPPOLoss,
        *,
        minibatch_segments: int,
        total_timesteps: int,
        update_epochs: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, value in (("minibatch_segments", minibatch_segments), ("total_timesteps", total_timesteps),
                            ("update_epochs", update_epochs)):
            if not isinstance(value, int) or value < 1:
                raise MettaError(f"MettaSegmentSampler: {name} must be a positive int, got {value!r}")
        self.loss = loss
        self.minibatch_segments = minibatch_segments
        self.total_timesteps = total_timesteps
        self.update_epochs = update_epochs
        self.generator = generator if generator is not None else torch.Generator()

    def num_minibatches(self, segments: int) -> int:
        """``segments // minibatch_segments``; raises unless it divides (SPEC §4)."""
        if segments % self.minibatch_segments or segments < self.minibatch_segments:
            raise MettaError(
                f"MettaSegmentSampler: the batch has {segments} rows (segments), not a positive multiple of "
                f"minibatch_segments ({self.minibatch_segments}); num_minibatches = "
                f"{segments / self.minibatch_segments:g} is not whole. Collect a multiple of "
                f"{self.minibatch_segments} rows or change minibatch_segments"
            )
        return segments // self.minibatch_segments

    def phase(self, batch: TensorDictBase, *, epoch: int) -> Iterator[tuple[int, TensorDictBase]]:
        """Yield ``(mb_idx, minibatch)`` for every update epoch of one phase at trainer ``epoch``."""
        who = type(self).__name__
        check_batch_time(batch, who)
        segments = batch.batch_size[0]
        num_minibatches = self.num_minibatches(segments)
        loss, keys = self.loss, self.loss.tensor_keys
        prio = loss.config.prioritized_experience_replay
        beta = anneal_beta(epoch, self.total_timesteps, batch.numel(), prio.prio_alpha, prio.prio_beta0)
        loss.zero_loss_tracker()
        loss.anneal_beta = beta
        has_advantage = batch.get(keys.advantage, None) is not None
        for _ in range(self.update_epochs):
            td = batch.clone(False)
            if not has_advantage:
                loss.first_pass(td)
            first_adv = read_bt(td, keys.advantage, field="advantage", who=who)
            values = read_bt(td, keys.value, field="value", who=who)
            loss.record_explained_variance(explained_variance(first_adv, values))
            for mb_idx in range(num_minibatches):
                idx, prio_w = prioritized_sample(
                    first_adv, self.minibatch_segments, prio_alpha=prio.prio_alpha, prio_beta=beta,
                    generator=self.generator,
                )
                minibatch = td[idx]
                minibatch.set(keys.priority_weight, prio_w.expand(-1, td.batch_size[1]).contiguous())
                yield mb_idx, minibatch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"generator"}:
            raise MettaError(f"MettaSegmentSampler.load_state_dict: expected keys ['generator'], got {sorted(state)}")
        self.generator.set_state(state["generator"])
