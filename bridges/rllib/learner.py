"""``MettaPPOLearner``: an RLlib ``TorchLearner`` whose update is one Metta training phase (SPEC §4).

``update`` replaces RLlib's minibatch loop (row shuffling, one step per minibatch) with Metta's
phase from ``metta_core.phase`` (the one the core trainer and the TorchRL bridge run): for each
epoch and minibatch, whole segments from ``MinibatchSchedule`` (prioritized, annealed ``beta``);
loss ``ppo_minibatch_loss`` (V-trace recompute and normalization per minibatch); the ``target_kl``
stop of ``PhaseStats``; every ``accumulate_minibatches`` minibatches one step through RLlib's
gradient path, ``compute_gradients`` -> ``postprocess_gradients`` -> ``apply_gradients``, whose
postprocessing is Metta's clip: ``clip_grad_norm_(module params, max_grad_norm)`` (SPEC §4.8). So a
subclass's overrides of these hooks, RLlib's ``gradients_<optimizer>_global_norm`` metric and its
non-finite-gradient handling in ``apply_gradients`` apply as in RLlib's own Learners.
The batch comes from ``MettaLayoutConnector``.

Gradient accumulation: RLlib's ``compute_gradients`` zeroes the gradients before its backward pass.
The first ``accumulate_minibatches - 1`` losses of a group are backpropagated as Metta does
(``loss.backward()`` adds into ``.grad``); the group's last loss goes through
``compute_gradients``, and the gradients accumulated before it are added to its result
(``g_last + (g_0 + ... )``, the same floating-point sum as backpropagating into ``.grad``).

With several learners (``num_learners > 1``, DDP over gloo/nccl) every learner runs the same
number of minibatches (fixed by the config, not by its shard), so the collective calls line up:
the advantage normalization's all-reduce (valid slots only, SPEC §3), DDP's gradient all-reduce,
and, with ``target_kl``, one all-reduce of the tracked ``approx_kl`` per minibatch after the first.
A shard with fewer rows than a minibatch is padded with fully masked rows.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Optional

import numpy as np
import torch
import tree  # dm_tree (RLlib's dependency): the stored states are nested
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import DIFF_NUM_GRAD_UPDATES_VS_SAMPLER_POLICY, WEIGHTS_SEQ_NO
from ray.rllib.utils.typing import ModuleID

from bridges.rllib.config import metta_settings
from bridges.rllib.layout import (
    LAYOUT_COLUMNS, MettaColumns, MettaLayoutConnector, check_metta_batch, check_module_inputs, empty_slots,
)
from bridges.rllib.loss import metta_module_loss, rllib_stats
from bridges.rllib.recurrent import STATEFUL_COLUMNS, check_sequence_length, check_stored_state, flat_outputs, row_batch
from metta_core.config import ADAM_EPS
from metta_core.errors import MettaError
from metta_core.phase import MinibatchSchedule, PhaseSizes, PhaseStats, run_phase
from metta_core.ppo_math import PPOTerms

METTA_STATE_KEY = "metta_loss"
"""Key of the Metta loss state in ``get_state()``: ``anneal_beta``, ``epoch``, ``generator``."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_over_learners(total: torch.Tensor) -> torch.Tensor:
    """``total`` summed over the learners when there are several (the ``PhaseStats`` reduction
    hook: the target-KL rule then reads the global mean ``approx_kl``)."""
    if _distributed():
        torch.distributed.all_reduce(total)
    return total


class MettaPPOLearner(TorchLearner):
    """RLlib Learner running Metta's PPO training phase; build it with ``metta_ppo_config``.

    Metrics (per module, means over the phase's minibatches, SPEC §4.7): ``policy_loss``,
    ``vf_loss``, ``entropy`` (RLlib's keys), ``approx_kl``, ``clipfrac``, ``importance``,
    ``current_logprobs``, ``explained_variance``, ``anneal_beta``; RLlib's ``vf_explained_var``,
    ``gradients_default_optimizer_global_norm`` and ``diff_num_grad_updates_vs_sampler_policy``.
    State (``get_state``/``set_state``, thus ``save_to_path``/``restore_from_path``): besides
    RLlib's module and optimizer state, ``anneal_beta``, the trainer ``epoch`` (phases run) and
    the sampling generator.
    """

    @classmethod
    @override(TorchLearner)
    def rl_module_required_apis(cls) -> list[type]:
        return [ValueFunctionAPI]

    @override(TorchLearner)
    def build(self) -> None:
        """Call ``super().build()``, then make ``MettaLayoutConnector`` the learner pipeline."""
        self._metta_ppo, self._metta_trainer = metta_settings(self.config)
        if self.config.add_default_connectors_to_learner_pipeline:
            raise MettaError(
                "MettaPPOLearner: add_default_connectors_to_learner_pipeline is True; RLlib's default pieces "
                "lay batches out per timestep. Build the config with metta_ppo_config(...) or set "
                "config.learners(add_default_connectors_to_learner_pipeline=False)"
            )
        super().build()
        if self._learner_connector is not None and not any(
            isinstance(c, MettaLayoutConnector) for c in self._learner_connector.connectors
        ):
            self._learner_connector.append(MettaLayoutConnector.from_config(self.config))
        for module_id in self.module.keys():
            module = self.module[module_id].unwrapped()
            if module.is_stateful():
                check_sequence_length(module, self._metta_trainer.bptt_horizon, where=f"MettaPPOLearner (module {module_id!r})")
        seed = 0 if self.config.seed is None else int(self.config.seed)
        self._metta_generator = torch.Generator().manual_seed(seed + 1_000_003 * self._learner_index)
        self._metta_epoch = 0
        self._metta_beta = self._metta_ppo.prioritized_experience_replay.prio_beta0  # anneal_beta at epoch 0
        self._metta_stats: Dict[ModuleID, PhaseStats] = defaultdict(lambda: PhaseStats(_sum_over_learners))

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id: ModuleID, config=None) -> None:
        """Metta's optimizer: ``Adam(eps=1e-12)`` (betas 0.9, 0.999), learning rate from RLlib's ``lr``."""
        params = self.get_parameters(self.module[module_id])
        self.register_optimizer(
            module_id=module_id,
            optimizer=torch.optim.Adam(params, eps=ADAM_EPS),
            params=params,
            lr_or_lr_schedule=config.lr,
        )

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        return metta_module_loss(learner=self, module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    def record_metta_terms(self, module_id: ModuleID, terms: PPOTerms) -> None:
        """Track one minibatch's stats (SPEC §4.7); a minibatch without valid slots is not tracked."""
        if terms.count:
            self._metta_stats[module_id].track(terms.stats())

    @override(TorchLearner)
    def update(
        self,
        batch=None,
        batches=None,
        batch_refs=None,
        episodes=None,
        episodes_refs=None,
        data_iterators=None,
        training_data: Optional[TrainingData] = None,
        *,
        timesteps: Optional[Dict[str, Any]] = None,
        _no_metrics_reduce: bool = False,
        **kwargs,
    ):
        """One Metta training phase on the given episodes or Metta-layout batch.

        RLlib's ``num_epochs``/``minibatch_size``/``shuffle_batch_per_epoch`` kwargs are ignored:
        the sizes come from the Metta settings (``metta_settings(config)``).
        """
        self._check_is_built()
        self.before_gradient_based_update(timesteps=timesteps or {})
        if training_data is None:
            training_data = TrainingData(
                batch=batch, batches=batches, batch_refs=batch_refs, episodes=episodes, episodes_refs=episodes_refs,
                data_iterators=data_iterators,
            )
        training_data.validate()
        training_data.solve_refs()
        if training_data.data_iterators:
            raise MettaError("MettaPPOLearner: data_iterators (offline RL) are not supported; pass episodes or a batch")
        self._weights_seq_no += 1
        self._log_off_policyness(training_data.episodes or [])
        ma_batch = self._make_batch_if_necessary(training_data=training_data)
        for module_id in self.module.keys():
            if not self.should_module_be_updated(module_id, ma_batch):
                continue
            module_batch = ma_batch.policy_batches.get(module_id)
            if module_batch is None:
                module = self.module[module_id].unwrapped()
                connector = MettaLayoutConnector(ppo=self._metta_ppo, horizon=self._metta_trainer.bptt_horizon)
                module_batch = connector.finish(module, empty_slots(module, 0))
            check_module_inputs(module_batch, self.module[module_id].unwrapped(),
                                where=f"MettaPPOLearner.update (module {module_id!r})")
            self._train_phase(module_id, dict(module_batch))
        self._log_steps_trained_metrics(ma_batch)
        self._metta_epoch += 1
        self.after_gradient_based_update(timesteps=timesteps or {})
        if not _no_metrics_reduce:
            return self.metrics.reduce()

    def _log_off_policyness(self, episodes: list) -> None:
        """RLlib's ``diff_num_grad_updates_vs_sampler_policy`` per module: the mean over the sampled
        steps of (this update's weights version - the version the env runner sampled with), from the
        episodes' ``WEIGHTS_SEQ_NO`` (RLlib computes it from the batch column, which the Metta layout
        does not carry). Episodes without it (built by hand) are skipped."""
        versions: Dict[ModuleID, list] = defaultdict(list)
        for episode in ConnectorV2.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            try:
                seq = episode.get_extra_model_outputs(WEIGHTS_SEQ_NO)
            except KeyError:
                continue
            versions[episode.module_id or DEFAULT_MODULE_ID].append(np.asarray(seq, dtype=np.float64).reshape(-1))
        for module_id, seqs in versions.items():
            steps = np.concatenate(seqs)
            if steps.size:
                lag = float(self._weights_seq_no - steps.mean())
                self.metrics.log_value((module_id, DIFF_NUM_GRAD_UPDATES_VS_SAMPLER_POLICY), lag, window=1)

    def _train_phase(self, module_id: ModuleID, batch: Dict[str, torch.Tensor]) -> None:
        """SPEC §4 for one module on its ``[segments, horizon]`` batch, driven by ``metta_core.phase``."""
        ppo, trainer = self._metta_ppo, self._metta_trainer
        horizon = trainer.bptt_horizon
        sizes = PhaseSizes.of(trainer)
        mb_segments = sizes.minibatch_segments
        where = f"MettaPPOLearner.update (module {module_id!r})"
        segments = check_metta_batch(batch, horizon, where=where)
        module = self.module[module_id].unwrapped()
        stateful = module.is_stateful()
        if stateful:
            check_stored_state(module, batch, where=where)
        batch = {c: batch[c] for c in LAYOUT_COLUMNS + (STATEFUL_COLUMNS if stateful else ())}
        if segments < mb_segments:  # a small or empty shard: pad with fully masked rows (zeros, mask False)
            extra = (mb_segments - segments) * horizon
            batch = tree.map_structure(lambda v: torch.cat([v, v.new_zeros((extra, *v.shape[1:]))]), batch)
            segments = mb_segments
        rows = tree.map_structure(lambda v: v.reshape(segments, horizon, *v.shape[1:]), batch)
        schedule = MinibatchSchedule(
            minibatch_segments=mb_segments, prio=ppo.prioritized_experience_replay,
            total_timesteps=trainer.total_timesteps, batch_size=trainer.batch_size, generator=self._metta_generator,
        )
        stats = self._metta_stats[module_id]
        stats.clear()
        optimizers = [opt for _, opt in self.get_optimizers_for_module(module_id)]
        last_loss = torch.zeros(())
        accumulate = sizes.accumulate_minibatches
        if accumulate > 1 and self._grad_scalers is not None:
            raise MettaError(
                f"MettaPPOLearner: accumulate_minibatches is {accumulate} with a torch grad scaler "
                f"(config.learners(_torch_grad_scaler_class=...)); the accumulated gradients would be unscaled. "
                f"Use max_minibatch_size >= minibatch_size or no grad scaler"
            )
        group_end_loss: list[torch.Tensor] = []  # the loss compute_gradients backpropagates
        ends_group = False

        def minibatch(_epoch: int, mb_idx: int) -> tuple[torch.Tensor, bool]:
            nonlocal last_loss, ends_group
            ends_group = (mb_idx + 1) % accumulate == 0
            stop = stats.target_kl_reached(mb_idx, ppo.target_kl)  # collective with several learners
            if mb_idx == 0:  # the connector's A0 (the buffer does not change during the phase)
                schedule.start_epoch(rows[Columns.ADVANTAGES], self._metta_epoch)
            idx, prio_w = schedule.draw()
            mb = tree.map_structure(lambda v: v[idx].reshape(mb_segments * horizon, *v.shape[2:]), rows)
            mb[MettaColumns.PRIO_WEIGHTS] = prio_w.expand(mb_segments, horizon).reshape(-1)
            if stateful:  # whole rows from their stored states (SPEC §6), outputs flat again for the loss
                module_rows = row_batch(module, mb, horizon, where=where)
                fwd_rows = self.module.forward_train({module_id: module_rows})[module_id]
                fwd_out = {module_id: flat_outputs(module, module_rows, fwd_rows)}
            else:
                fwd_out = self.module.forward_train({module_id: mb})
            last_loss = self.compute_losses(fwd_out=fwd_out, batch={module_id: mb})[module_id]
            return last_loss, stop

        def zero_grad() -> None:
            for opt in optimizers:
                opt.zero_grad()

        def backward(loss: torch.Tensor) -> None:
            if ends_group:
                group_end_loss.append(loss)
            else:
                loss.backward()

        def step() -> None:
            self._gradient_step(module_id, group_end_loss.pop() if group_end_loss else None)

        run_phase(sizes, minibatch, zero_grad=zero_grad, backward=backward, step=step)
        self._metta_beta = schedule.beta
        mask = batch[Columns.LOSS_MASK]
        # explained variance over the valid slots of the whole buffer (SPEC §4, end of phase)
        if int(mask.sum()) > 1:
            stats.record_explained_variance(batch[Columns.ADVANTAGES][mask], batch[Columns.VF_PREDS][mask])
        else:
            stats.values["explained_variance"] = [0.0]
        self.metrics.log_dict(rllib_stats({**stats.means(), "anneal_beta": self._metta_beta}), key=module_id, window=1)
        self.metrics.log_value((module_id, self.TOTAL_LOSS_KEY), float(last_loss.detach()), window=1)

    def _gradient_step(self, module_id: ModuleID, loss: Optional[torch.Tensor]) -> None:
        """One optimizer step of ``module_id`` through RLlib's gradient path; ``loss`` is the last loss of
        the accumulation group (``None`` if it needs no gradient), the earlier ones are in ``.grad``."""
        params = self.get_parameters(self.module[module_id])
        accumulated = {self.get_param_ref(p): p.grad.clone() for p in params if p.grad is not None}
        grads = dict(self.compute_gradients({module_id: loss})) if loss is not None else {}
        for ref, grad in accumulated.items():
            grads[ref] = grad if grads.get(ref) is None else grads[ref].add_(grad)
        grads = {ref: grad for ref, grad in grads.items() if grad is not None}
        self.apply_gradients(self.postprocess_gradients(grads))

    @override(TorchLearner)
    def postprocess_gradients_for_module(self, *, module_id: ModuleID, config=None, module_gradients_dict):
        """Metta's clip (SPEC §4.8): ``clip_grad_norm_(module params, max_grad_norm)`` on the given gradients.

        Logs RLlib's ``gradients_<optimizer>_global_norm`` (the global norm before clipping), as
        RLlib's ``grad_clip_by="global_norm"`` does. ``config.grad_clip`` equals ``max_grad_norm``
        and ``grad_clip_by`` is ``"global_norm"`` (``metta_settings`` refuses anything else).
        """
        params = [
            p for p in self.get_parameters(self.module[module_id])
            if p.requires_grad and self.get_param_ref(p) in module_gradients_dict
        ]
        for p in params:
            p.grad = module_gradients_dict[self.get_param_ref(p)]
        norm = torch.nn.utils.clip_grad_norm_(params, self._metta_ppo.max_grad_norm)
        for name, _ in self.get_optimizers_for_module(module_id):
            self.metrics.log_value((module_id, f"gradients_{name}_global_norm"), norm.detach(), window=1)
        return {**module_gradients_dict, **{self.get_param_ref(p): p.grad for p in params}}

    @override(TorchLearner)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component(METTA_STATE_KEY, components, not_components):
            state[METTA_STATE_KEY] = {
                "anneal_beta": self._metta_beta,
                "epoch": self._metta_epoch,
                "generator": self._metta_generator.get_state().numpy(),
            }
        return state

    @override(TorchLearner)
    def set_state(self, state) -> None:
        super().set_state(state)
        if METTA_STATE_KEY in state:
            metta = state[METTA_STATE_KEY]
            self._metta_beta = float(metta["anneal_beta"])
            self._metta_epoch = int(metta["epoch"])
            self._metta_generator.set_state(torch.as_tensor(np.asarray(metta["generator"]), dtype=torch.uint8))
