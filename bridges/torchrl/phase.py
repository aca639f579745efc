"""``MettaPPOPhase``: one Metta training phase per collected batch, for your own TorchRL loop.

    loss = MettaPPOLoss(actor, critic)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3, eps=1e-12)
    sampler = MettaSegmentSampler(loss, minibatch_segments=16, total_timesteps=500_000, update_epochs=4,
                                  generator=torch.Generator().manual_seed(0))
    train_phase = MettaPPOPhase(loss, optimizer, sampler)
    for epoch, data in enumerate(collector):            # [num_envs, steps] batches
        rows = data.reshape(-1, 32)                       # whole rows of bptt_horizon steps
        stats = train_phase(rows, epoch=epoch)            # SPEC §4: every minibatch, clip, step, target KL

The driver is ``metta_core.phase.run_phase`` (the one the core trainer and the RLlib learner
use); this module only connects it to the loss, the sampler and a torch optimizer.
"""

from __future__ import annotations

import dataclasses

import torch
from tensordict import TensorDictBase

from metta_core.errors import MettaError, require_positive_ints
from metta_core.phase import clip_and_step, run_phase

from bridges.torchrl.loss import MettaPPOLoss
from bridges.torchrl.sampler import MettaSegmentSampler

LOSS_PREFIX = "loss_"
"""The loss module's differentiable outputs are the entries named ``loss_*`` (TorchRL's convention)."""


class MettaPPOPhase:
    """Train ``loss`` on one ``[B, T]`` batch the way Metta's trainer does (SPEC §4.1-4.8).

    For each update epoch and minibatch (rows from ``sampler``): the target-KL check, the loss
    call (tracked in ``loss.phase_stats``), backward of the sum of the ``loss_*`` entries, and
    every ``accumulate_minibatches`` minibatches ``clip_grad_norm_(loss.parameters(),
    max_grad_norm)`` then ``optimizer.step()`` (``max_grad_norm`` defaults to the loss's
    ``PPOConfig.max_grad_norm``). ``__call__`` returns ``loss.stats()``; ``epochs_trained`` is
    how many update epochs the last phase ran (fewer when ``target_kl`` stopped it).
    """

    def __init__(
        self,
        loss: MettaPPOLoss,
        optimizer: torch.optim.Optimizer,
        sampler: MettaSegmentSampler,
        *,
        accumulate_minibatches: int = 1,
        max_grad_norm: float | None = None,
    ) -> None:
        if sampler.loss is not loss:
            raise MettaError("MettaPPOPhase: the sampler was built for another loss; use MettaSegmentSampler(loss, ...)")
        require_positive_ints("MettaPPOPhase", accumulate_minibatches=accumulate_minibatches)
        self.loss = loss
        self.optimizer = optimizer
        self.sampler = sampler
        self.accumulate_minibatches = accumulate_minibatches
        self.max_grad_norm = loss.config.max_grad_norm if max_grad_norm is None else max_grad_norm
        self.epochs_trained = 0

    def __call__(self, batch: TensorDictBase, *, epoch: int) -> dict[str, float]:
        """One phase on ``batch`` at trainer ``epoch`` (it sets the annealed ``beta``). An ``epoch``
        outside ``loss.config.schedule`` trains nothing, as the core's loss does there (SPEC §5): no
        optimizer step, no sampler draw, empty stats."""
        loss, sampler = self.loss, self.sampler
        if not loss.config.schedule.is_active(epoch):
            self.epochs_trained = 0
            return {}
        sizes = sampler.start_phase(batch, epoch=epoch)
        sizes = dataclasses.replace(sizes, accumulate_minibatches=self.accumulate_minibatches)
        target_kl = loss.config.target_kl

        def minibatch(_epoch: int, mb_idx: int) -> tuple[torch.Tensor, bool]:
            stop = loss.phase_stats.target_kl_reached(mb_idx, target_kl)
            out = loss(sampler.minibatch(mb_idx))
            return sum(value for key, value in out.items() if key.startswith(LOSS_PREFIX)), stop

        self.epochs_trained = run_phase(
            sizes, minibatch, zero_grad=self.optimizer.zero_grad,
            step=clip_and_step(loss.parameters(), [self.optimizer], self.max_grad_norm),
        )
        return loss.stats()
