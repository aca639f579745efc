"""The segmented rollout buffer of the Metta trainer (SPEC §1, §4 buffer sizes).

A row (segment) is one agent's contiguous slice of ``bptt_horizon`` steps; rows are filled
agent by agent as steps arrive, and an agent moves on to the next free row when its row is full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from tensordict import TensorDict

from metta_core.config import buffer_sizes
from metta_core.errors import MettaError


@dataclass(frozen=True)
class FieldSpec:
    """One buffer field: the shape of a single step's entry and its dtype."""

    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class ExperienceSpec:
    """Named per-step fields (the small stand-in for ``torchrl.data.Composite``)."""

    fields: Mapping[str, FieldSpec] = field(default_factory=dict)

    def merge(self, other: "ExperienceSpec") -> "ExperienceSpec":
        """Union of two specs; a name declared twice with different shape or dtype is an error."""
        merged = dict(self.fields)
        for name, spec in other.fields.items():
            if name in merged and merged[name] != spec:
                raise MettaError(
                    f"experience field {name!r} is declared twice with different specs: "
                    f"{merged[name]} and {spec}; rename one of them"
                )
            merged[name] = spec
        return ExperienceSpec(merged)

    def zeros(self, batch: tuple[int, ...], device: torch.device | str = "cpu") -> TensorDict:
        return TensorDict(
            {name: torch.zeros(*batch, *s.shape, dtype=s.dtype, device=device) for name, s in self.fields.items()},
            batch_size=list(batch),
            device=device,
        )


class Experience:
    """Rollout buffer of shape ``[segments, bptt_horizon]`` with Metta's store bookkeeping.

    ``segments = batch_size // bptt_horizon`` must be at least ``total_agents``; minibatch
    divisibility follows ``metta_core.config.buffer_sizes`` and errors name the numbers.
    """

    def __init__(
        self,
        total_agents: int,
        batch_size: int,
        bptt_horizon: int,
        minibatch_size: int,
        max_minibatch_size: int,
        experience_spec: ExperienceSpec,
        device: torch.device | str = "cpu",
    ) -> None:
        sizes = buffer_sizes(batch_size, bptt_horizon, minibatch_size, max_minibatch_size)
        self.segments = sizes["segments"]
        if total_agents > self.segments:
            raise MettaError(
                f"batch_size ({batch_size}) is too small for {total_agents} agents: segments "
                f"({self.segments} = batch_size // bptt_horizon {bptt_horizon}) must be >= total_agents "
                f"({total_agents}); set batch_size to at least {total_agents * bptt_horizon}"
            )
        self.total_agents = total_agents
        self.batch_size = batch_size
        self.bptt_horizon = bptt_horizon
        self.minibatch_size = sizes["minibatch_size"]
        self.accumulate_minibatches = sizes["accumulate_minibatches"]
        self.minibatch_segments = sizes["minibatch_segments"]
        self.num_minibatches = sizes["num_minibatches"]
        self.device = torch.device(device)
        self.spec = experience_spec
        self.buffer = experience_spec.zeros((self.segments, bptt_horizon), self.device)
        self.ep_lengths = torch.zeros(total_agents, dtype=torch.long)
        self.ep_indices = torch.arange(total_agents) % self.segments
        self.free_idx = total_agents % self.segments
        self.full_rows = 0
        self._row_index: dict[tuple, slice | torch.Tensor] = {}

    @property
    def ready_for_training(self) -> bool:
        """Whether the rollout has filled every row since ``reset_for_rollout``."""
        return self.full_rows >= self.segments

    def reset_for_rollout(self) -> None:
        self.full_rows = 0

    def _rows(self, env_id: slice) -> slice | torch.Tensor:
        """Buffer rows of agents ``env_id`` (``ep_indices[env_id]``), as a slice when they are
        consecutive (a basic-indexing copy instead of an ``index_put``); cached until the agents
        move to new rows."""
        key = (env_id.start, env_id.stop, env_id.step)
        rows = self._row_index.get(key)
        if rows is None:
            rows = self.ep_indices[env_id]
            first = int(rows[0]) if len(rows) else 0
            if torch.equal(rows, torch.arange(first, first + len(rows))):
                rows = slice(first, first + len(rows))
            self._row_index[key] = rows
        return rows

    def store(self, data_td: TensorDict, env_id: slice) -> None:
        """Write one step of agents ``env_id`` (a slice; all at the same position in their rows)."""
        if not isinstance(env_id, slice):
            raise MettaError(f"Experience.store: env_id must be a slice of agents, got {type(env_id).__name__}")
        values = {name: data_td.get(name, None) for name in self.spec.fields}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise MettaError(f"Experience.store: the step is missing buffer fields {missing}")
        step = int(self.ep_lengths[env_id.start])
        rows = self._rows(env_id)
        for name, value in values.items():  # field by field: a tensordict-level indexed write costs 10x more
            self.buffer.get(name)[rows, step] = value.to(self.device)
        self.ep_lengths[env_id] += 1
        if step + 1 >= self.bptt_horizon:
            num_full = len(range(*env_id.indices(self.total_agents)))
            self.ep_indices[env_id] = (self.free_idx + torch.arange(num_full)) % self.segments
            self._row_index.clear()
            self.ep_lengths[env_id] = 0
            self.free_idx = (self.free_idx + num_full) % self.segments
            self.full_rows += num_full

    def state_dict(self) -> dict:
        """Bookkeeping and buffer, so a resumed run fills rows exactly as before."""
        return {
            "buffer": self.buffer.to_dict(),
            "ep_lengths": self.ep_lengths.clone(),
            "ep_indices": self.ep_indices.clone(),
            "free_idx": self.free_idx,
            "full_rows": self.full_rows,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.buffer.update(TensorDict(state["buffer"], batch_size=self.buffer.batch_size))
        self.ep_lengths.copy_(state["ep_lengths"])
        self.ep_indices.copy_(state["ep_indices"])
        self._row_index.clear()
        self.free_idx = int(state["free_idx"])
        self.full_rows = int(state["full_rows"])
