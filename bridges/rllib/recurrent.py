"""Stateful RLModules in the Metta layout: stored input states, the row forward, Metta's recurrent module.

SPEC §6 on RLlib. A stateful module's Metta-layout batch carries, per slot, the stored input state
``Columns.STATE_IN`` (a tree of ``[slots, ...]`` tensors, the state the env runner fed into that
step) and ``STATE_RESETS`` (``dones or truncateds`` of SPEC §6, bool ``[slots]``).
The module runs on whole ``[rows, horizon]`` rows: ``Columns.STATE_IN`` of column 0 (zeroed where
column 0 resets) starts the row, as RLlib's ``AddStatesFromEpisodesToBatch`` starts each
``max_seq_len`` sequence, and the module steps through the row with gradients (RLlib's own forward;
no state is refreshed). A reset after column 0 can only be honoured by a module that zeroes its state
itself (``MettaRecurrentModule``; ``ZEROES_STATE_ON_RESETS``); ``MettaLayoutConnector`` never makes
one (each episode chunk starts a row), a hand-made batch for another module is refused.
RLlib carries a continuing episode's state into the next ``sample()``; ``zero_state_at_rollout_start``
zeroes it there, as Metta's ``reset_memory`` does at each rollout's start.

``MettaRecurrentModule`` is ``metta_core.recurrent_policy.RecurrentActorCritic`` as an RLlib module
(same parameters and names under ``net.``, same init, the core's unroll); the CLI's ``--policy
lstm|gru`` on RLlib.
"""

from __future__ import annotations

from typing import Any, Mapping

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical, TorchDiagGaussian
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils import force_list
from torch.utils._pytree import tree_flatten, tree_map

from bridges.rllib.config import METTA_KEY
from metta_core.errors import MettaError
from metta_core.recurrent import zero_where_reset
from metta_core.recurrent_policy import RecurrentActorCritic

STATE_RESETS = "metta_state_resets"
"""Batch column: ``dones[t] or truncateds[t]`` per slot (SPEC §6), bool; zeroes the state before step t."""

STATEFUL_COLUMNS = (Columns.STATE_IN, STATE_RESETS)
"""The columns a stateful module's Metta-layout batch has besides ``LAYOUT_COLUMNS``."""

ZEROES_STATE_ON_RESETS = "metta_zeroes_state_on_resets"
"""Attribute a module sets to True when its forward reads ``STATE_RESETS`` and zeroes its state there."""


def zero_state_where(state: Any, reset: torch.Tensor) -> Any:
    """``metta_core.recurrent.zero_where_reset`` on every leaf of an RLlib state tree (``[rows, ...]`` leaves)."""
    def leaf(s: torch.Tensor) -> torch.Tensor:
        flat = s.reshape(s.shape[0], 1, -1).transpose(0, 1)
        return zero_where_reset((flat,), reset)[0].transpose(0, 1).reshape(s.shape)

    return tree_map(leaf, state)


def check_sequence_length(module, horizon: int, *, where: str) -> None:
    """A stateful module's ``model_config["max_seq_len"]`` (RLlib's training sequence length) must be
    ``bptt_horizon``, the one sequence length of the Metta layout: MettaError naming both and the fix."""
    max_seq_len = (module.model_config or {}).get("max_seq_len")
    if max_seq_len is not None and max_seq_len != horizon:
        raise MettaError(
            f"{where}: the stateful module's model_config max_seq_len ({max_seq_len}) differs from Metta's "
            f"bptt_horizon ({horizon}); the Metta layout trains rows of bptt_horizon steps, so they must agree: set "
            f"config.rl_module(model_config={{..., 'max_seq_len': {horizon}}}) or metta_ppo_config(bptt_horizon="
            f"{max_seq_len}) (metta_ppo_config sets max_seq_len = bptt_horizon unless model_config is replaced)"
        )


def check_stored_state(module, batch: Mapping[str, Any], *, where: str) -> None:
    """``Columns.STATE_IN`` present, with the keys of ``module.get_initial_state()`` and per-slot
    shapes ``[slots, *initial.shape]``; ``STATE_RESETS`` bool ``[slots]``. MettaError naming the fix."""
    fix = "build the batch with bridges.rllib.MettaLayoutConnector (it stores each step's input state)"
    if Columns.STATE_IN not in batch:
        raise MettaError(
            f"{where}: {type(module).__name__} is stateful but the batch has no {Columns.STATE_IN!r} column (the "
            f"stored input state of every slot, SPEC §6); {fix}"
        )
    slots = batch[Columns.OBS].shape[0]
    initial, initial_spec = tree_flatten(module.get_initial_state())
    stored, stored_spec = tree_flatten(batch[Columns.STATE_IN])
    if stored_spec != initial_spec:
        raise MettaError(
            f"{where}: column {Columns.STATE_IN!r} has the structure {stored_spec}, the module's initial state "
            f"{initial_spec}; {fix}"
        )
    for i, (s, init) in enumerate(zip(stored, initial)):
        expected = (slots, *init.shape)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != expected:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise MettaError(
                f"{where}: column {Columns.STATE_IN!r} leaf {i} has shape {got}, expected {expected} ([slots] + the "
                f"shape of the module's get_initial_state() leaf); the states were stored by a module of another "
                f"size: {fix} from episodes sampled by this module"
            )
    resets = batch.get(STATE_RESETS)
    if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool or tuple(resets.shape) != (slots,):
        got = f"{resets.dtype} {tuple(resets.shape)}" if isinstance(resets, torch.Tensor) else repr(resets)
        raise MettaError(
            f"{where}: column {STATE_RESETS!r} must be a bool tensor of shape ({slots},) (dones or truncateds of "
            f"each slot, SPEC §6), got {got}; {fix}"
        )


def row_batch(module, batch: Mapping[str, Any], horizon: int, *, where: str) -> dict[str, Any]:
    """A flat Metta-layout batch of whole rows -> RLlib's ``[rows, horizon, ...]`` module input.

    Tensor columns are reshaped to ``[rows, horizon, ...]``; ``Columns.STATE_IN`` becomes the stored
    state of column 0 (``[rows, ...]``), zeroed where column 0 resets (SPEC §6). Resets after
    column 0 are refused unless the module zeroes its state itself (``ZEROES_STATE_ON_RESETS``).
    """
    check_stored_state(module, batch, where=where)
    rows = batch[Columns.OBS].shape[0] // horizon
    out = {
        c: v.reshape(rows, horizon, *v.shape[1:])
        for c, v in batch.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows * horizon
    }
    resets = out[STATE_RESETS]
    if horizon > 1 and not getattr(module, ZEROES_STATE_ON_RESETS, False) and bool(resets[:, 1:].any()):
        raise MettaError(
            f"{where}: column {STATE_RESETS!r} resets the state after column 0 of a row, which "
            f"{type(module).__name__} cannot do (RLlib's recurrent modules step through a sequence without "
            f"resets); start every episode at column 0 of a row (MettaLayoutConnector does), or use a module "
            f"that zeroes its state on {STATE_RESETS!r} (bridges.rllib.recurrent.MettaRecurrentModule)"
        )
    first = tree_map(lambda s: s.reshape(rows, horizon, *s.shape[1:])[:, 0], batch[Columns.STATE_IN])
    out[Columns.STATE_IN] = zero_state_where(first, resets[:, 0])
    return out


def flat_outputs(module, rows: Mapping[str, Any], fwd_out: Mapping[str, Any]) -> dict[str, Any]:
    """``forward_train`` outputs on ``[rows, horizon]`` -> flat ``[rows * horizon, ...]`` for the loss.

    ``Columns.VF_PREDS`` holds the module's values of the rows (from ``EMBEDDINGS`` when the module
    returns them, else ``compute_values`` on the rows), so the loss never runs a stateful module on
    flat slots. The output state is dropped (stored states are not refreshed, SPEC §6).
    """
    values = module.compute_values(rows, embeddings=fwd_out.get(Columns.EMBEDDINGS))
    out = {
        k: v.reshape(-1, *v.shape[2:])
        for k, v in fwd_out.items()
        if k not in (Columns.STATE_OUT, Columns.EMBEDDINGS) and isinstance(v, torch.Tensor)
    }
    out[Columns.VF_PREDS] = values.reshape(-1)
    return out


ZERO_STATE_KEY = "zero_state_at_rollout_start"
"""Key in ``learner_config_dict["metta"]``: set by ``zero_state_at_rollout_start(config)``."""


def zero_next_input_state(*, env_runner, **kwargs) -> None:
    """``on_sample_end`` callback: the input state the env runner prepared for the next ``sample()``'s
    first step (``SingleAgentEnvRunner._cached_to_module``, computed before the episodes are cut) is
    zeroed, as Metta zeroes every agent's state at a rollout's start (``reset_memory``)."""
    cached = getattr(env_runner, "_cached_to_module", None)
    if isinstance(cached, dict) and Columns.STATE_IN in cached:
        cached[Columns.STATE_IN] = tree_map(torch.zeros_like, cached[Columns.STATE_IN])


def zero_state_at_rollout_start(config):
    """Make a single-agent ``metta_ppo_config`` start every rollout (``sample()`` call; one per learner
    batch and env runner with ``rollout_fragment_length="auto"``) from zero states, as Metta does,
    where RLlib carries a continuing episode's state: ``zero_next_input_state`` runs at the end of each
    ``sample()`` and ``MettaLayoutConnector`` stores zeros as every chunk's first input state."""
    config.callbacks(on_sample_end=[*force_list(config.callbacks_on_sample_end), zero_next_input_state])
    config.learner_config_dict[METTA_KEY][ZERO_STATE_KEY] = True
    return config


class MettaRecurrentModule(TorchRLModule, ValueFunctionAPI):
    """``RecurrentActorCritic`` (LSTM or GRU, Metta's init, SPEC §6) as an RLlib ``TorchRLModule``.

    ``model_config``: ``hidden_size`` (128), ``cell`` (``"lstm"`` or ``"gru"``), ``num_layers`` (1),
    ``shared_core`` (False), ``seed`` (the parameters are drawn after ``torch.manual_seed(seed)``, as
    ``metta_core.run.build_policy`` draws them, so the core's run with that seed starts from the same
    weights) and ``max_seq_len`` (must equal the trainer's ``bptt_horizon``). The state is a dict of the core's
    stored-state fields (``actor_lstm_h``, ``actor_lstm_c``, ``critic_lstm_h``, ...), each
    ``[layers, hidden]`` per agent; the forward is the core's unroll over ``[rows, T]`` from
    ``Columns.STATE_IN`` with ``STATE_RESETS`` (when given) zeroing the state before a step.
    Action distribution: RLlib's ``TorchCategorical``, or ``TorchDiagGaussian`` on ``[mean, log_std]``.
    """

    def setup(self) -> None:
        config = self.model_config
        with torch.random.fork_rng():
            torch.manual_seed(int(config.get("seed", 0)))
            self.net = RecurrentActorCritic(
                self.observation_space, self.action_space, int(config.get("hidden_size", 128)),
                num_layers=int(config.get("num_layers", 1)), cell=config.get("cell", "lstm"),
                shared_core=bool(config.get("shared_core", False)),
            )
        setattr(self, ZEROES_STATE_ON_RESETS, True)

    def get_initial_state(self) -> dict[str, torch.Tensor]:
        return {key: torch.zeros(self.net.state_shape) for key in self.net.state_keys}

    def _features(self, batch: Mapping[str, Any]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Each trunk's ``[rows, T, 2 * hidden]`` features and the state after the last step."""
        obs = batch[Columns.OBS]
        if obs.dim() != 2 + len(self.net.obs_shape):
            raise MettaError(
                f"MettaRecurrentModule: {Columns.OBS!r} has shape {tuple(obs.shape)}, expected [rows, T, "
                f"{', '.join(map(str, self.net.obs_shape))}] (RLlib's sequence input with {Columns.STATE_IN!r}); a "
                f"stock Learner runs forward_train on flat Metta-layout slots: train stateful modules with "
                f"MettaPPOLearner (metta_ppo_config)"
            )
        rows, steps = obs.shape[:2]
        x = obs.reshape(rows, steps, -1).float()
        resets = batch.get(STATE_RESETS)
        resets = torch.zeros(rows, steps, dtype=torch.bool, device=x.device) if resets is None else resets.bool()
        state_in = batch[Columns.STATE_IN]
        features, state_out = [], {}
        for trunk in self.net.trunks:
            stored = tuple(state_in[key].transpose(0, 1) for key in trunk.state_keys)
            f, last = trunk.unroll_features(x, stored, resets)
            features.append(f)
            state_out.update({key: s.transpose(0, 1) for key, s in zip(trunk.state_keys, last)})
        return features, state_out

    def _forward(self, batch: Mapping[str, Any], **kwargs) -> dict[str, Any]:
        features, state_out = self._features(batch)
        out = self.net.actor(features[0])
        if self.net.continuous:
            out = torch.cat([out, self.net.log_std.expand_as(out)], dim=-1)
        return {Columns.ACTION_DIST_INPUTS: out, Columns.STATE_OUT: state_out, Columns.EMBEDDINGS: features[-1]}

    def compute_values(self, batch: Mapping[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            embeddings = self._features(batch)[0][-1]
        return self.net.critic(embeddings).squeeze(-1)

    def get_train_action_dist_cls(self):
        return TorchDiagGaussian if isinstance(self.action_space, gym.spaces.Box) else TorchCategorical

    get_inference_action_dist_cls = get_train_action_dist_cls
    get_exploration_action_dist_cls = get_train_action_dist_cls
