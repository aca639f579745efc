"""One Metta training phase, framework-neutral (SPEC §4): written once, used by the core loop,
the TorchRL bridge and the RLlib learner.

- ``PhaseSizes``: how many update epochs, minibatches per epoch, rows per minibatch, and
  minibatches per optimizer step.
- ``MinibatchSchedule``: which rows each minibatch trains on (SPEC §4.2-4.3): at the first
  minibatch of each update epoch the first-pass advantages ``A0`` and the annealed ``beta``;
  per minibatch, whole rows drawn by ``prioritized_sample`` and their importance weights.
- ``PhaseStats``: the per-minibatch stats of the phase (SPEC §4.7), the target-KL rule (§4.1)
  and the explained variance (end of §4), with a reduction hook for several learners.
- ``run_phase``: the epoch x minibatch driver (§4.1, §4.8): target-KL stop before a backward,
  zero_grad at the start of each accumulation group, clip-and-step at its end.

The pieces are separate because the frameworks own different parts of a phase: the core's
``PPO`` loss draws its own rows inside ``Loss.train`` (as Metta's does), while the TorchRL
sampler and the RLlib learner draw them around the loss call. Each composes the same pieces.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from metta_core.config import PrioritizedExperienceReplayConfig, TrainerConfig
from metta_core.errors import MettaError, require_positive_ints
from metta_core.ppo_math import anneal_beta, explained_variance, prioritized_sample

__all__ = ["PhaseSizes", "MinibatchSchedule", "PhaseStats", "run_phase", "clip_and_step"]


@dataclass(frozen=True)
class PhaseSizes:
    """The shape of one phase (SPEC §4 buffer sizes)."""

    update_epochs: int
    """Passes over the buffer."""
    num_minibatches: int
    """Minibatches per pass: ``segments / minibatch_segments``."""
    minibatch_segments: int
    """Whole rows per minibatch: ``minibatch_size / bptt_horizon``."""
    accumulate_minibatches: int = 1
    """Minibatches whose gradients add up before one clip-and-step."""

    def __post_init__(self) -> None:
        require_positive_ints(
            "PhaseSizes", update_epochs=self.update_epochs, num_minibatches=self.num_minibatches,
            minibatch_segments=self.minibatch_segments, accumulate_minibatches=self.accumulate_minibatches,
        )

    @classmethod
    def of(cls, trainer: TrainerConfig) -> "PhaseSizes":
        """The sizes Metta derives from a ``TrainerConfig`` (``buffer_sizes``)."""
        sizes = trainer.sizes
        return cls(
            update_epochs=trainer.update_epochs,
            num_minibatches=sizes["num_minibatches"],
            minibatch_segments=sizes["minibatch_segments"],
            accumulate_minibatches=sizes["accumulate_minibatches"],
        )


class MinibatchSchedule:
    """Which rows each minibatch of a phase trains on (SPEC §4.2-4.3).

    At the first minibatch of each update epoch, ``start_epoch(A0, trainer_epoch)`` takes the
    first-pass advantages ``A0`` of the whole ``[segments, horizon]`` buffer and sets::

        beta = prio_beta0 + (1 - prio_beta0) * prio_alpha * trainer_epoch / max(1, total_timesteps // batch_size)

    then each ``draw()`` returns ``prioritized_sample(A0, minibatch_segments, prio_alpha, beta,
    generator)``: row indices ``[minibatch_segments]`` (unique within a draw, not across draws)
    and importance weights ``[minibatch_segments, 1]``. With a seeded ``generator`` the draws are
    reproducible; without it they use the global RNG as ``torch.multinomial`` does.
    """

    def __init__(
        self,
        *,
        minibatch_segments: int,
        prio: PrioritizedExperienceReplayConfig,
        total_timesteps: int,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        require_positive_ints(
            "MinibatchSchedule", minibatch_segments=minibatch_segments, total_timesteps=total_timesteps,
            batch_size=batch_size,
        )
        self.minibatch_segments = minibatch_segments
        self.prio = prio
        self.total_timesteps = total_timesteps
        self.batch_size = batch_size
        self.generator = generator
        self.first_advantages: Tensor | None = None
        self.beta = self.beta_at(0)

    def beta_at(self, trainer_epoch: int) -> float:
        """The annealed importance exponent at ``trainer_epoch`` (SPEC §4.2)."""
        return anneal_beta(
            trainer_epoch, total_timesteps=self.total_timesteps, batch_size=self.batch_size,
            prio_alpha=self.prio.prio_alpha, prio_beta0=self.prio.prio_beta0,
        )

    def start_epoch(self, first_advantages: Tensor, trainer_epoch: int) -> None:
        """Take this update epoch's ``A0`` (``[segments, horizon]``, no grad) and set ``beta``."""
        if first_advantages.dim() != 2:
            raise MettaError(
                f"MinibatchSchedule.start_epoch: first_advantages must be [segments, horizon], "
                f"got shape {tuple(first_advantages.shape)}"
            )
        self.first_advantages = first_advantages.detach()
        self.beta = self.beta_at(trainer_epoch)

    def draw(self) -> tuple[Tensor, Tensor]:
        """``(idx, prio_weights)`` of the next minibatch (SPEC §4.3)."""
        if self.first_advantages is None:
            raise MettaError("MinibatchSchedule.draw: no first-pass advantages; call start_epoch(A0, epoch) first")
        return prioritized_sample(
            self.first_advantages, self.minibatch_segments,
            prio_alpha=self.prio.prio_alpha, prio_beta=self.beta, generator=self.generator,
        )


Reduce = Callable[[Tensor], Tensor]
"""Sums a float64 tensor over learners (e.g. an all-reduce) and returns it."""


class PhaseStats:
    """The stats of one training phase (SPEC §4.7, end of §4) and the target-KL rule (§4.1).

    ``values`` maps a stat name to the values tracked in this phase (Metta's ``loss_tracker``).
    ``reduce`` (optional) sums ``[sum, count]`` over learners, so that with several learners the
    target-KL rule reads the global mean of the tracked ``approx_kl``; ``means`` stays local.
    """

    def __init__(self, reduce: Reduce | None = None) -> None:
        self.values: defaultdict[str, list[float]] = defaultdict(list)
        self.reduce = reduce

    def clear(self) -> None:
        """Forget the tracked values (a phase starts)."""
        for tracked in self.values.values():
            tracked.clear()

    def track(self, stats: Mapping[str, float]) -> None:
        """Append one minibatch's stats."""
        for name, value in stats.items():
            self.values[name].append(float(value))

    def record_explained_variance(self, first_advantages: Tensor, values: Tensor) -> None:
        """``explained_variance = 1 - var(A0) / var(A0 + values)`` over the buffer (the last call wins)."""
        self.values["explained_variance"] = [explained_variance(first_advantages, values)]

    def mean(self, name: str) -> float | None:
        """Mean of the values of ``name`` tracked so far (over learners with ``reduce``); None if none."""
        tracked = self.values.get(name, [])
        if self.reduce is None:
            return sum(tracked) / len(tracked) if tracked else None
        total = self.reduce(torch.tensor([float(sum(tracked)), float(len(tracked))], dtype=torch.float64))
        return float(total[0] / total[1]) if float(total[1]) > 0 else None

    def target_kl_reached(self, mb_idx: int, target_kl: float | None) -> bool:
        """SPEC §4.1: with ``target_kl`` set and ``mb_idx > 0``, whether the mean ``approx_kl``
        tracked so far exceeds it (then the minibatch is evaluated, not stepped, and the phase ends).

        With ``reduce``, every learner must call this at the same minibatches (it is collective).
        """
        if target_kl is None or mb_idx == 0:
            return False
        kl = self.mean("approx_kl")
        return kl is not None and kl > target_kl

    def means(self) -> dict[str, float]:
        """Mean of each tracked stat over the phase (Metta's ``stats()``)."""
        return {name: sum(v) / len(v) for name, v in self.values.items() if v}

    def state_dict(self) -> dict[str, list[float]]:
        return {name: list(v) for name, v in self.values.items()}

    def load_state_dict(self, state: Mapping[str, Iterable[float]]) -> None:
        self.values.clear()
        self.values.update({name: [float(x) for x in v] for name, v in state.items()})


MinibatchFn = Callable[[int, int], "tuple[Tensor, bool]"]


def run_phase(
    sizes: PhaseSizes,
    minibatch: MinibatchFn,
    *,
    zero_grad: Callable[[], None],
    step: Callable[[], None],
    backward: Callable[[Tensor], None] | None = None,
    on_minibatch_end: Callable[[int], None] | None = None,
) -> int:
    """Drive one phase (SPEC §4.1, §4.8); returns the number of update epochs trained.

    For each update epoch ``e`` and ``mb_idx`` in ``range(num_minibatches)``::

        zero_grad()                      if mb_idx % accumulate_minibatches == 0
        loss, stop = minibatch(e, mb_idx)
        if stop: end the phase           (target KL: evaluated, no backward, no step)
        backward(loss)                   (skipped when loss does not require grad)
        step()                           if (mb_idx + 1) % accumulate_minibatches == 0
        on_minibatch_end(mb_idx)

    ``minibatch`` draws its rows, computes its loss, tracks its stats and answers the
    target-KL question (``PhaseStats.target_kl_reached``) for this minibatch. ``step`` is the
    clip-and-step (``clip_and_step``) or a framework's gradient path.
    """
    backward = backward or (lambda loss: loss.backward())
    accumulate = sizes.accumulate_minibatches
    epochs_trained = 0
    for epoch in range(sizes.update_epochs):
        stop = False
        for mb_idx in range(sizes.num_minibatches):
            if mb_idx % accumulate == 0:
                zero_grad()
            loss, stop = minibatch(epoch, mb_idx)
            if stop:
                break
            if loss.requires_grad:  # False when every loss is outside its schedule
                backward(loss)
            if (mb_idx + 1) % accumulate == 0:
                step()
            if on_minibatch_end is not None:
                on_minibatch_end(mb_idx)
        epochs_trained += 1
        if stop:
            break
    return epochs_trained


def clip_and_step(
    parameters: Iterable[torch.nn.Parameter], optimizers: Iterable[Any], max_grad_norm: float
) -> Callable[[], None]:
    """Metta's step (SPEC §4.8): ``clip_grad_norm_(parameters, max_grad_norm)``, then each optimizer's ``step()``."""
    params = [p for p in parameters if p.requires_grad]
    optimizers = list(optimizers)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        for optimizer in optimizers:
            optimizer.step()

    return step
