"""RLlib runner: ``MettaPPOLearner`` built with ``config.build_learner()`` (no Ray cluster).

The RLModule is ``ActorCriticModule``: the case's ``ActorCritic`` as an RLlib ``TorchRLModule``
with ``ValueFunctionAPI`` (Categorical logits, or ``[mean, log_std]`` for RLlib's diagonal
Gaussian); for a recurrent case the bridge's stateful ``MettaRecurrentModule`` (the case's
``RecurrentActorCritic``), with every slot's stored state in ``Columns.STATE_IN`` and
``dones or truncateds`` in ``STATE_RESETS``, run on whole rows as ``MettaPPOLearner`` runs them. The batch is the case buffer in the bridge's Metta layout (``bridges.rllib.layout``):
flat ``[segments * horizon]`` columns, every slot valid (``LOSS_MASK`` all True), ``ADVANTAGES``
from the bridge's ``first_pass_advantage``.

A multi-agent case (``layout.agents = A``) goes through RLlib's own containers instead: each
group of ``A`` rows becomes ``MultiAgentEpisode``s of agents ``agent_0 .. agent_<A-1>`` (split at
the terminal flags, same-step autoreset as ``bridges.rllib.MettaGridMultiAgentEnv`` delivers
them, with its stream infos), and ``MettaLayoutConnector`` lays them out; the rows it makes must
be the case's rows (checked on the observations), then the case's stored values are the batch's
``VF_PREDS`` (computed in float64 by the case writer, as for the flat batch).
"""

from __future__ import annotations

import numpy as np
import torch
import tree  # dm_tree (RLlib's dependency): the stored states are nested
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical, TorchDiagGaussian
from ray.rllib.env.multi_agent_episode import MultiAgentEpisode
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from metta_core.errors import MettaError
from metta_core.policy import ActorCritic

from bridges.rllib import MettaColumns, metta_loss_terms, metta_ppo_config
from bridges.rllib.layout import STEP_KEY, STREAM_KEY, MettaLayoutConnector, first_pass_advantage
from bridges.rllib.recurrent import STATE_RESETS, MettaRecurrentModule, flat_outputs, row_batch
from metta_core.config import ADAM_EPS

from bridges.conformance.cases import Case
from bridges.conformance.reference import PHASE_STAT_NAMES, Measurement
from bridges.conformance.runners import one_step, snapshot, spaces, unsupported_features

RLLIB_BETAS = (0.9, 0.999)
"""Adam betas of ``MettaPPOLearner`` (torch defaults; not configurable through RLlib's config)."""

STAT_KEYS = {"value_loss": "vf_loss"}
"""Metta stat name -> the learner's metric key, where they differ."""

PREFIX = "net."
"""Prefix of the ``ActorCritic`` parameter names inside ``ActorCriticModule``."""


LAST_ACTION_WHY = ("RLlib's PrevActionsPrevRewards connector restarts the previous action at every episode "
                   "start, Metta's last_actions carries it across episode ends; no bridge mapping yet, "
                   "bridges/rllib/README.md")
"""Why the RLlib bridge does not map ``last_actions`` (its README's divergence table)."""


def unsupported(case: Case) -> str | None:
    """Why this runner cannot run ``case`` yet, or None (it runs recurrent and multi-agent cases, not
    policies conditioned on their last action)."""
    return unsupported_features(case, recurrent=True, multi_agent=True, last_action=False,
                                last_action_why=LAST_ACTION_WHY)


class ActorCriticModule(TorchRLModule, ValueFunctionAPI):
    """``metta_core.policy.ActorCritic`` as an RLlib module; ``model_config = {"hidden": [...]}``."""

    def setup(self) -> None:
        self.net = ActorCritic(self.observation_space, self.action_space, tuple(self.model_config.get("hidden", ())))

    def _forward(self, batch, **kwargs):
        out = self.net.actor(batch[Columns.OBS].float())
        if self.net.continuous:
            out = torch.cat([out, self.net.log_std.expand_as(out)], dim=-1)
        return {Columns.ACTION_DIST_INPUTS: out}

    def compute_values(self, batch, embeddings=None):
        return self.net.critic(batch[Columns.OBS].float()).squeeze(-1)

    def get_train_action_dist_cls(self):
        return TorchDiagGaussian if self.net.continuous else TorchCategorical

    get_inference_action_dist_cls = get_train_action_dist_cls
    get_exploration_action_dist_cls = get_train_action_dist_cls


def _check_expressible(case: Case) -> None:
    opt = case.config["optimizer"]
    if tuple(opt["betas"]) != RLLIB_BETAS:
        raise MettaError(f"case {case.name!r}, field 'optimizer.betas': rllib cannot express betas {opt['betas']}; "
                         f"MettaPPOLearner uses Adam betas {list(RLLIB_BETAS)}")
    if opt["eps"] != ADAM_EPS:
        raise MettaError(f"case {case.name!r}, field 'optimizer.eps': rllib cannot express eps {opt['eps']}; "
                         f"MettaPPOLearner uses Adam eps {ADAM_EPS}")


def _learner(case: Case):
    """A built ``MettaPPOLearner`` holding the case's initial weights."""
    _check_expressible(case)
    trainer = case.config["trainer"]
    fields = {k: trainer[k] for k in ("batch_size", "bptt_horizon", "minibatch_size", "max_minibatch_size",
                                      "update_epochs", "total_timesteps")}
    policy = case.config["policy"]
    if case.policy_kind == "mlp":
        spec = RLModuleSpec(module_class=ActorCriticModule, model_config={"hidden": list(policy["hidden"])})
    else:
        spec = RLModuleSpec(module_class=MettaRecurrentModule, model_config={
            "cell": case.policy_kind, "hidden_size": policy["hidden_size"], "num_layers": policy["num_layers"],
            "shared_core": policy["shared_core"], "max_seq_len": trainer["bptt_horizon"]})
    config = (
        metta_ppo_config(None, **case.config["ppo"], **fields)
        .training(lr=case.config["optimizer"]["lr"])
        .rl_module(rl_module_spec=spec)
    )
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: spaces(case)})
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    module.net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in case.weights.items()}, strict=True)
    return learner, module


def _columns(case: Case) -> dict[str, torch.Tensor]:
    """The whole buffer as flat Metta-layout columns with ``A0`` from the bridge."""
    data = case.tensors()
    n = data["values"].numel()
    batch = {
        Columns.OBS: data["env_obs"].reshape(n, -1),
        Columns.ACTIONS: data["actions"].reshape(n, *data["actions"].shape[2:]),
        Columns.ACTION_LOGP: data["act_log_prob"].reshape(n),
        Columns.VF_PREDS: data["values"].reshape(n),
        Columns.REWARDS: data["rewards"].reshape(n),
        Columns.TERMINATEDS: data["dones"].reshape(n),
        Columns.LOSS_MASK: torch.ones(n, dtype=torch.bool),
    }
    if case.policy_kind != "mlp":  # every step's stored input state and its reset flag (SPEC §6)
        batch[Columns.STATE_IN] = {key: data[key].reshape(n, *data[key].shape[2:]) for key in case.state_keys}
        batch[STATE_RESETS] = (data["dones"] + data["truncateds"]).reshape(n) > 0
    batch[Columns.ADVANTAGES] = first_pass_advantage(batch, case.trainer.bptt_horizon, case.ppo)
    return batch


def _group_episodes(case: Case, group: int) -> list[MultiAgentEpisode]:
    """Rows ``group * A .. group * A + A - 1`` of the case as the ``MultiAgentEpisode``s an env runner
    returns: episodes end where the (shared) terminal flag is set, the observation after the last
    action is a zero placeholder (the case has none; the connector drops it at a row's end)."""
    data, agents = case.data, case.agents
    rows = range(group * agents, (group + 1) * agents)
    ids = [f"agent_{a}" for a in range(agents)]
    horizon = data["values"].shape[1]
    obs = np.concatenate([data["env_obs"][rows], np.zeros_like(data["env_obs"][rows][:, :1])], axis=1)
    rewards = np.concatenate([data["rewards"][rows][:, 1:], np.zeros((agents, 1), np.float32)], axis=1)
    ends = data["dones"][rows][:, 1:].astype(bool)  # ends[:, t]: the step after action t started a new episode

    def info(t: int) -> dict:
        return {a: {STREAM_KEY: (0, group), STEP_KEY: t} for a in ids}

    episodes, episode = [], None
    for t in range(horizon + 1):
        if episode is None:
            episode = MultiAgentEpisode(agent_to_module_mapping_fn=lambda agent_id, ep: DEFAULT_MODULE_ID)
            episode.add_env_reset(observations={a: obs[i, t] for i, a in enumerate(ids)}, infos=info(t))
        if t == horizon:
            break
        done = t + 1 < horizon and bool(ends[:, t].any())
        episode.add_env_step(
            observations={a: obs[i, t + 1] for i, a in enumerate(ids)},
            actions={a: data["actions"][rows][i, t] for i, a in enumerate(ids)},
            rewards={a: float(rewards[i, t]) for i, a in enumerate(ids)},
            infos=info(t + 1),
            terminateds={**{a: done for a in ids}, "__all__": done},
            extra_model_outputs={a: {Columns.ACTION_LOGP: data["act_log_prob"][rows][i, t]} for i, a in enumerate(ids)},
        )
        if done:
            episodes.append(episode.to_numpy())
            episode = None
    return episodes + [episode.to_numpy()]


def _columns_from_episodes(case: Case, learner) -> dict[str, torch.Tensor]:
    """The case through per-agent ``MultiAgentEpisode``s and ``MettaLayoutConnector``; ``VF_PREDS``
    the case's values and ``ADVANTAGES`` recomputed from them, once the rows are checked."""
    groups = case.data["values"].shape[0] // case.agents
    episodes = [ep for g in range(groups) for ep in _group_episodes(case, g)]
    connector = MettaLayoutConnector(ppo=case.ppo, horizon=case.trainer.bptt_horizon)
    batch = dict(connector(rl_module=learner.module, batch={}, episodes=episodes)[DEFAULT_MODULE_ID])
    flat = _columns(case)
    horizon = case.trainer.bptt_horizon

    def read(column: str, x: torch.Tensor) -> torch.Tensor:  # column 0 of rewards and dones is never read
        return x.reshape(-1, horizon)[:, 1:] if column in (Columns.REWARDS, Columns.TERMINATEDS) else x

    for column in (Columns.OBS, Columns.ACTIONS, Columns.ACTION_LOGP, Columns.REWARDS, Columns.TERMINATEDS,
                   Columns.LOSS_MASK):
        if not torch.equal(read(column, batch[column]), read(column, flat[column].to(batch[column].dtype))):
            raise MettaError(f"case {case.name!r}: MettaLayoutConnector put the per-agent episodes' {column!r} in "
                             f"other rows than the case's (rows env * agents + agent)")
    batch[Columns.VF_PREDS] = flat[Columns.VF_PREDS]
    batch[Columns.ADVANTAGES] = first_pass_advantage(batch, horizon, case.ppo)
    return batch


def run(case: Case) -> Measurement:
    """The one-minibatch check (the learner's loss and optimizer) and one ``learner.update`` phase."""
    ppo, trainer = case.ppo, case.trainer
    horizon = trainer.bptt_horizon
    learner, module = _learner(case)
    columns = _columns_from_episodes(case, learner) if case.agents > 1 else _columns(case)
    idx = torch.from_numpy(case.idx)
    minibatch = tree.map_structure(lambda v: v.reshape(-1, horizon, *v.shape[1:])[idx].reshape(-1, *v.shape[1:]),
                                   columns)
    minibatch[MettaColumns.PRIO_WEIGHTS] = torch.from_numpy(case.prio_weights.copy()).expand(-1, horizon).reshape(-1)
    if module.is_stateful():  # whole rows from their stored states, as MettaPPOLearner runs them
        rows = row_batch(module, minibatch, horizon, where="rllib runner")
        fwd = {DEFAULT_MODULE_ID: flat_outputs(module, rows, learner.module.forward_train({DEFAULT_MODULE_ID: rows})[
            DEFAULT_MODULE_ID])}
    else:
        fwd = learner.module.forward_train({DEFAULT_MODULE_ID: minibatch})
    loss = learner.compute_losses(fwd_out=fwd, batch={DEFAULT_MODULE_ID: minibatch})[DEFAULT_MODULE_ID]
    terms = metta_loss_terms(module, minibatch, fwd[DEFAULT_MODULE_ID], ppo, horizon)
    optimizers = [opt for _, opt in learner.get_optimizers_for_module(DEFAULT_MODULE_ID)]
    grads, after_step = one_step(loss, list(module.named_parameters()), optimizers, ppo.max_grad_norm, PREFIX)

    learner, module = _learner(case)
    learner.set_state({"metta_loss": {
        "anneal_beta": ppo.prioritized_experience_replay.prio_beta0,
        "epoch": case.config["trainer_epoch"],
        "generator": torch.Generator().manual_seed(case.config["sample_seed"]).get_state().numpy(),
    }})
    results = learner.update(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)},
                                                   env_steps=int(np.prod(case.data["values"].shape))))
    metrics = results[DEFAULT_MODULE_ID]
    phase = {k: float(metrics[STAT_KEYS.get(k, k)].peek()) for k in PHASE_STAT_NAMES if STAT_KEYS.get(k, k) in metrics}
    return Measurement(terms={"loss": float(loss.detach()), **terms.stats()}, grads=grads,
                       params_after_step=after_step, phase_stats=phase,
                       params_after_phase=snapshot(module.named_parameters(), PREFIX))
