"""TorchRL's multi-agent group layout (``("agents", key)`` entries of batch ``[B, T, agents]``) folded
into Metta's rows: row ``b * agents + a`` (SPEC §1), the same numbers as the flat rows, and errors."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import ProbabilisticActor, ValueOperator

from bridges.torchrl import MettaAdvantage, MettaPPOLoss, MettaSegmentSampler
from bridges.torchrl.layout import as_rows
from metta_core.errors import MettaError

from tests.torchrl.helpers import ACTIONS, OBS, make_batch, make_modules

ENVS, AGENTS, T = 3, 4, 8
FLAGS = ("done", "terminated", "truncated")


def group_modules(seed: int = 0):
    """``make_modules``' networks (same weights) reading and writing ``("agents", key)`` entries."""
    actor, critic = make_modules(seed)
    group_actor = ProbabilisticActor(
        TensorDictModule(actor.module[0].module, in_keys=[("agents", "observation")], out_keys=[("agents", "logits")]),
        in_keys=[("agents", "logits")], out_keys=[("agents", "action")],
        distribution_class=torch.distributions.Categorical, return_log_prob=True,
    )
    group_critic = ValueOperator(critic.module, in_keys=[("agents", "observation")], out_keys=[("agents", "state_value")])
    return (actor, critic), (group_actor, group_critic)


def flat_batch(actor, critic) -> TensorDict:
    """``ENVS * AGENTS`` rows whose terminal flags are shared by the agents of an env (all end together)."""
    batch = make_batch(actor, critic, B=ENVS * AGENTS, T=T)
    for name in FLAGS:
        env_flags = batch["next", name][::AGENTS]
        batch["next", name] = env_flags.repeat_interleave(AGENTS, dim=0)
    return batch


def to_group_layout(flat: TensorDict, log_prob_key) -> TensorDict:
    """The slow way: agent ``a`` of env ``b`` (flat row ``b * AGENTS + a``) at ``[b, :, a]`` of the group."""
    agents = [ENVS, T, AGENTS]  # a group's batch, as TorchRL's multi-agent specs make it
    group = TensorDict({"agents": TensorDict({}, agents), "next": {"agents": TensorDict({}, agents)}}, [ENVS, T])
    per_agent = {
        ("agents", "observation"): flat["observation"], ("agents", "action"): flat["action"],
        log_prob_key: flat["action_log_prob"], ("agents", "state_value"): flat["state_value"],
        ("next", "agents", "observation"): flat["next", "observation"],
        ("next", "agents", "reward"): flat["next", "reward"],
        **{("next", "agents", name): flat["next", name] for name in FLAGS},
    }
    for key, x in per_agent.items():
        out = torch.zeros(ENVS, T, AGENTS, *x.shape[2:], dtype=x.dtype)
        for b in range(ENVS):
            for a in range(AGENTS):
                out[b, :, a] = x[b * AGENTS + a]
        group.set(key, out)
    for name in FLAGS:  # the env's shared flags, as a multi-agent env writes them
        group.set(("next", name), flat["next", name][::AGENTS])
    group.set(("collector", "traj_ids"), torch.arange(ENVS).unsqueeze(1).expand(ENVS, T))
    return group


def group_loss(group_actor, group_critic) -> MettaPPOLoss:
    loss = MettaPPOLoss(group_actor, group_critic)
    loss.set_keys(reward=("agents", "reward"), terminated=("agents", "terminated"), done=("agents", "done"),
                  value=("agents", "state_value"))
    return loss


@pytest.fixture
def batches():
    (actor, critic), (group_actor, group_critic) = group_modules()
    flat = flat_batch(actor, critic)
    loss = group_loss(group_actor, group_critic)
    return (actor, critic, flat), (group_actor, group_critic, to_group_layout(flat, loss.tensor_keys.sample_log_prob))


def test_the_group_actor_logs_its_log_prob_in_the_group(batches):
    (_, _, _), (group_actor, group_critic, _) = batches
    assert group_loss(group_actor, group_critic).tensor_keys.sample_log_prob == ("agents", "action_log_prob")


def test_folding_puts_agent_a_of_env_b_at_row_b_times_agents_plus_a(batches):
    (_, _, flat), (_, _, group) = batches
    rows = as_rows(group, "test")
    assert tuple(rows.batch_size) == (ENVS * AGENTS, T)
    assert torch.equal(rows["agents", "observation"], flat["observation"])
    assert torch.equal(rows["next", "agents", "reward"], flat["next", "reward"])
    assert torch.equal(rows["next", "terminated"], flat["next", "terminated"])  # shared flags repeated per agent
    for b in range(ENVS):
        for a in range(AGENTS):
            assert torch.equal(rows["collector", "traj_ids"][b * AGENTS + a], group["collector", "traj_ids"][b])


def test_a_batch_without_groups_is_not_copied(batches):
    (_, _, flat), _ = batches
    assert as_rows(flat, "test") is flat


@pytest.mark.parametrize("shared_flags", [True, False], ids=["per-agent-flags", "shared-flags-only"])
def test_group_layout_loss_is_bit_identical_to_the_flat_rows(batches, shared_flags):
    (actor, critic, flat), (group_actor, group_critic, group) = batches
    flat_out = MettaPPOLoss(actor, critic)(flat)
    loss = group_loss(group_actor, group_critic)
    if not shared_flags:
        loss.set_keys(terminated="terminated", done="done")  # the env's shared flags, repeated per agent
    group_out = loss(group)
    for key in flat_out.keys():
        assert torch.equal(flat_out[key], group_out[key]), key


def test_group_layout_gradients_are_bit_identical(batches):
    (actor, critic, flat), (group_actor, group_critic, group) = batches
    grads = []
    for loss, batch in ((MettaPPOLoss(actor, critic, functional=False), flat),
                        (group_loss(group_actor, group_critic), group)):
        out = loss(batch)
        total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
        grads.append(torch.autograd.grad(total, list(loss.parameters())))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_the_sampler_draws_the_same_rows_from_the_group_layout(batches):
    (actor, critic, flat), (group_actor, group_critic, group) = batches
    drawn = []
    for loss, batch in ((MettaPPOLoss(actor, critic), flat), (group_loss(group_actor, group_critic), group)):
        sampler = MettaSegmentSampler(loss, minibatch_segments=4, total_timesteps=10_000, update_epochs=2,
                                      generator=torch.Generator().manual_seed(5))
        drawn.append([(mb["action"] if "action" in mb.keys() else mb["agents", "action"],
                       mb["priority_weight"], loss(mb)["loss_objective"]) for _, mb in sampler.phase(batch, epoch=1)])
    assert len(drawn[0]) == len(drawn[1]) == 2 * ENVS * AGENTS // 4
    for (a1, w1, l1), (a2, w2, l2) in zip(*drawn):
        assert torch.equal(a1, a2) and torch.equal(w1, w2) and torch.equal(l1, l2)


def test_groups_with_different_agent_counts_are_refused(batches):
    _, (group_actor, group_critic, group) = batches
    group.set("others", TensorDict({"observation": torch.zeros(ENVS, T, 3, OBS)}, [ENVS, T, 3]))
    with pytest.raises(MettaError, match=r"different agent counts \('agents': 4 agents.*'others': 3 agents"):
        group_loss(group_actor, group_critic)(group)


def test_next_group_with_another_agent_count_is_refused(batches):
    _, (group_actor, group_critic, group) = batches
    group["next"] = group["next"].exclude("agents")
    group.set(("next", "agents"), TensorDict({"reward": torch.zeros(ENVS, T, 3, 1)}, [ENVS, T, 3]))
    with pytest.raises(MettaError, match=r"\('next', 'agents'\): 3 agents"):
        MettaSegmentSampler(group_loss(group_actor, group_critic), minibatch_segments=4, total_timesteps=10_000
                            ).start_phase(group, epoch=0)


def test_per_agent_flags_that_disagree_with_the_shared_ones_are_refused(batches):
    _, (group_actor, group_critic, group) = batches
    group["next", "agents", "terminated"][1, 2, 3] = ~group["next", "agents", "terminated"][1, 2, 3]
    with pytest.raises(MettaError, match=r"per-agent \('next', 'agents', 'terminated'\) disagrees with the shared "
                                         r"\('next', 'terminated'\) at 1 agent-step"):
        group_loss(group_actor, group_critic)(group)


def test_an_inactive_agent_is_refused(batches):
    _, (group_actor, group_critic, group) = batches
    mask = torch.ones(ENVS, T, AGENTS, dtype=torch.bool)
    mask[0, 5, 1] = False
    group.set(("agents", "mask"), mask)
    with pytest.raises(MettaError, match=r"\('agents', 'mask'\) marks 1 inactive agent-step"):
        group_loss(group_actor, group_critic)(group)


def test_the_estimator_alone_refuses_the_group_layout_and_names_the_fold(batches):
    _, (group_actor, group_critic, group) = batches
    estimator = MettaAdvantage(gamma=0.99, gae_lambda=0.95, value_network=group_critic)
    with pytest.raises(MettaError, match=r"agent groups \('agents': 4 agents.*as_rows"):
        estimator(group)


def test_a_fold_keeps_the_time_dim_name(batches):
    _, (_, _, group) = batches
    group.names = [None, "time"]
    assert as_rows(group, "test").names == [None, "time"]


def test_the_conformance_runner_feeds_the_multi_agent_case_in_the_group_layout():
    """The case's rows e * 4 + a reach the loss as ("agents", key) entries [envs, horizon, 4] and fold back."""
    from bridges.conformance.cases import CASES_DIR, load_case
    from bridges.conformance.runners import torchrl as runner

    case = load_case(CASES_DIR / "multi_agent_shared_policy.json")
    loss, _ = runner._loss(case)
    batch = runner._batch(case, loss)
    segments, horizon = case.tensors()["values"].shape
    assert batch.batch_size == (segments // 4, horizon) and batch["agents"].batch_size == (segments // 4, horizon, 4)
    assert "observation" not in batch.keys() and ("next", "terminated") in batch.keys(True)
    rows = as_rows(batch, "test")
    assert torch.equal(rows["agents", "observation"], case.tensors()["env_obs"])
    assert torch.equal(rows["agents", "state_value"][..., 0], case.tensors()["values"])
