"""Metta's minibatch rows for a collected TorchRL ``[B, T]`` batch (SPEC §4.2-4.3), keys only."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from tensordict import TensorDictBase

from metta_core.errors import MettaError, require_positive_ints
from metta_core.phase import MinibatchSchedule, PhaseSizes

from bridges.torchrl.layout import as_rows, read_bt
from bridges.torchrl.loss import MettaPPOLoss


class MettaSegmentSampler:
    """Minibatches of whole rows of a collected ``[B, T]`` batch, with ``priority_weight`` set.

    The rows come from ``metta_core.phase.MinibatchSchedule`` (SPEC §4.2-4.3); this class only
    reads and writes the TorchRL keys. One training phase on a batch of ``B`` rows of ``T`` steps::

        for e in range(update_epochs):
            A0 = batch[advantage] if present, else loss.first_pass(batch)   # whole batch, w = 1
            schedule.start_epoch(A0, epoch)                                 # beta (SPEC §4.2)
            for mb_idx in range(B // minibatch_segments):
                idx, prio_w = schedule.draw()                               # SPEC §4.3
                yield mb_idx, batch[idx] with advantage = A0[idx], priority_weight = prio_w

    A batch in TorchRL's multi-agent group layout is folded into agent rows first (``layout.as_rows``),
    so ``B`` counts agent-rows. ``phase`` is that loop as a generator; ``start_phase`` + ``minibatch`` are its steps, for
    drivers such as ``MettaPPOPhase``. Starting a phase clears the loss's phase stats and sets
    ``loss.anneal_beta``; each first pass records ``explained_variance(A0, values)`` on them.
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
        require_positive_ints(
            "MettaSegmentSampler", minibatch_segments=minibatch_segments, total_timesteps=total_timesteps,
            update_epochs=update_epochs,
        )
        self.loss = loss
        self.minibatch_segments = minibatch_segments
        self.total_timesteps = total_timesteps
        self.update_epochs = update_epochs
        self.generator = generator if generator is not None else torch.Generator()
        self._batch: TensorDictBase | None = None
        self._rows: TensorDictBase | None = None
        self._schedule: MinibatchSchedule | None = None
        self._epoch = 0

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

    def start_phase(self, batch: TensorDictBase, *, epoch: int, accumulate_minibatches: int = 1) -> PhaseSizes:
        """Check ``batch`` (``[B, T]``), clear the loss's phase stats, and return the phase's sizes."""
        batch = as_rows(batch, type(self).__name__)  # TorchRL's agent groups folded into rows
        num_minibatches = self.num_minibatches(batch.batch_size[0])
        self._schedule = MinibatchSchedule(
            minibatch_segments=self.minibatch_segments,
            prio=self.loss.config.prioritized_experience_replay,
            total_timesteps=self.total_timesteps,
            batch_size=batch.numel(),
            generator=self.generator,
        )
        self._batch, self._rows, self._epoch = batch, None, epoch
        self.loss.zero_loss_tracker()
        self.loss.anneal_beta = self._schedule.beta_at(epoch)
        return PhaseSizes(
            update_epochs=self.update_epochs, num_minibatches=num_minibatches,
            minibatch_segments=self.minibatch_segments, accumulate_minibatches=accumulate_minibatches,
        )

    def minibatch(self, mb_idx: int) -> TensorDictBase:
        """The next minibatch of the phase begun by ``start_phase``; ``mb_idx == 0`` starts an update epoch."""
        if self._batch is None or self._schedule is None:
            raise MettaError("MettaSegmentSampler.minibatch: no phase started; call start_phase(batch, epoch=...) first")
        if mb_idx == 0 or self._rows is None:
            self._start_epoch()
        idx, prio_w = self._schedule.draw()
        minibatch = self._rows[idx]
        minibatch.set(self.loss.tensor_keys.priority_weight, prio_w.expand(-1, self._rows.batch_size[1]).contiguous())
        return minibatch

    def _start_epoch(self) -> None:
        who, loss, keys = type(self).__name__, self.loss, self.loss.tensor_keys
        rows = self._batch.clone(False)  # the first pass writes advantage and value_target: not into the caller's
        if self._batch.get(keys.advantage, None) is None:
            loss.first_pass(rows)
        first_adv = read_bt(rows, keys.advantage, field="advantage", who=who)
        values = read_bt(rows, keys.value, field="value", who=who)
        loss.phase_stats.record_explained_variance(first_adv, values)
        self._schedule.start_epoch(first_adv, self._epoch)
        self._rows = rows

    def phase(self, batch: TensorDictBase, *, epoch: int) -> Iterator[tuple[int, TensorDictBase]]:
        """Yield ``(mb_idx, minibatch)`` for every update epoch of one phase at trainer ``epoch``."""
        sizes = self.start_phase(batch, epoch=epoch)
        for _ in range(sizes.update_epochs):
            for mb_idx in range(sizes.num_minibatches):
                yield mb_idx, self.minibatch(mb_idx)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"generator"}:
            raise MettaError(f"MettaSegmentSampler.load_state_dict: expected keys ['generator'], got {sorted(state)}")
        self.generator.set_state(state["generator"])
