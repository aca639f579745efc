"""Core runner: ``metta_core`` directly (``ppo_minibatch_loss``; ``PPO`` + ``CoreTrainingLoop`` for the phase).

Runs every kind of case: MLP cases through ``ActorCritic`` on the flattened rows, recurrent ones
through ``RecurrentActorCritic`` on whole ``[rows, horizon]`` rows with their stored states (SPEC
§6) and, for a policy conditioned on its last action, the stored ``last_actions``; and
multi-agent cases like any other: agents are already rows (``layout.agents``, SPEC §1).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tensordict import TensorDict

from metta_core.advantage import compute_advantage
from metta_core.experience import Experience
from metta_core.ppo import PPO
from metta_core.ppo_math import ppo_minibatch_loss
from metta_core.loop import ComponentContext, CoreTrainingLoop

from bridges.conformance.cases import DATA_FIELDS, Case
from bridges.conformance.reference import PHASE_STAT_NAMES, Measurement
from bridges.conformance.runners import case_policy, one_step, optimizer, snapshot, spaces


def _forward(policy, case: Case, rows: dict[str, torch.Tensor]) -> TensorDict:
    """The policy's outputs on ``[mb, horizon]`` rows: flattened for an MLP, whole rows (with the
    reset flags and stored states) for a recurrent policy."""
    mb, horizon = rows["values"].shape
    if case.policy_kind == "mlp":
        flat = TensorDict({"env_obs": rows["env_obs"].reshape(mb * horizon, -1)}, batch_size=[mb * horizon])
        return policy(flat, action=rows["actions"].reshape(mb * horizon, *rows["actions"].shape[2:]))
    fields = policy.get_agent_experience_spec().fields
    return policy(TensorDict({k: rows[k] for k in fields}, batch_size=[mb, horizon]), action=rows["actions"])


def run(case: Case) -> Measurement:
    """The one-minibatch check on rows ``case.idx`` and a whole training phase."""
    ppo, trainer = case.ppo, case.trainer
    data = case.tensors()
    idx = torch.from_numpy(case.idx)
    mb, horizon = len(idx), trainer.bptt_horizon

    policy = case_policy(case)
    first_adv = compute_advantage(
        data["values"], data["rewards"], data["dones"], torch.ones_like(data["values"]),
        gamma=ppo.gamma, gae_lambda=ppo.gae_lambda, rho_clip=ppo.vtrace.rho_clip, c_clip=ppo.vtrace.c_clip,
    )
    rows = {k: v[idx] for k, v in data.items()}
    out = _forward(policy, case, rows)
    terms = ppo_minibatch_loss(
        ppo, old_logprob=rows["act_log_prob"], new_logprob=out["act_log_prob"].reshape(mb, horizon),
        entropy=out["entropy"].reshape(mb, horizon), new_values=out["values"].reshape(mb, horizon),
        values=rows["values"], rewards=rows["rewards"], dones=rows["dones"], advantages=first_adv[idx],
        prio_weights=torch.from_numpy(case.prio_weights.copy()),
    )
    grads, after_step = one_step(terms.loss, list(policy.named_parameters()),
                                 [optimizer(case, policy.parameters())], ppo.max_grad_norm)

    policy = case_policy(case)
    opt = optimizer(case, policy.parameters())
    obs_space, action_space = spaces(case)
    env = SimpleNamespace(single_observation_space=obs_space, single_action_space=action_space)
    loss = PPO(policy, trainer, env, "cpu", "ppo", ppo, torch.Generator().manual_seed(case.config["sample_seed"]))
    spec = policy.get_agent_experience_spec().merge(loss.get_experience_spec())
    experience = Experience(1, trainer.batch_size, horizon, trainer.minibatch_size, trainer.max_minibatch_size, spec)
    for name in (*DATA_FIELDS, *case.policy_keys):
        experience.buffer[name] = data[name]
    context = ComponentContext(policy=policy, experience=experience, optimizer=opt, config=trainer,
                               epoch=case.config["trainer_epoch"])
    loop = CoreTrainingLoop(policy, experience, {"ppo": loss}, opt, "cpu", context)
    stats, _ = loop.training_phase(context, trainer.update_epochs, ppo.max_grad_norm)
    return Measurement(
        terms={"loss": float(terms.loss.detach()), **terms.stats()}, grads=grads, params_after_step=after_step,
        phase_stats={k: stats[k] for k in PHASE_STAT_NAMES if k in stats},
        params_after_phase=snapshot(policy.named_parameters()),
    )
