"""TorchRL conventions on MettaPPOLoss (issue 14) give the canonical numbers where Metta defines them.

Each test runs a TorchRL habit (composite single-head actor, keyword call, shared trunk,
``separate_losses``, TorchRL's estimators with or without a recorded value, TorchRL's constructor
arguments) and compares it with ``ppo_minibatch_loss`` on the same networks, computed by hand
(``core_terms``) or with the plain call. TorchRL's own tests, ported: ``tests/torchrl/upstream/``.
"""

import functools

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import CompositeDistribution, TensorDictModule, TensorDictSequential, set_composite_lp_aggregate
from torch import nn
from torchrl.modules import ActorCriticWrapper, ActorValueOperator, ProbabilisticActor, ValueOperator
from torchrl.objectives.utils import ValueEstimators

from bridges.torchrl import MettaPPOLoss
from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import ppo_minibatch_loss
from tests.torchrl.helpers import ACTIONS, OBS, make_batch, make_modules, metta_layout
from tests.torchrl.test_loss import LOSS_KEYS, core_terms, total


def close(a, b):
    assert torch.allclose(a, b, atol=1e-6), (a, b)


def composite_actor(actor):
    """``actor``'s network behind TorchRL's composite distribution with one head ``("action", "action1")``."""
    body = actor.module[0].module
    return ProbabilisticActor(
        TensorDictModule(body, in_keys=["observation"], out_keys=[("params", "action1", "logits")]),
        in_keys=["params"], out_keys=[("action", "action1")], return_log_prob=True,
        distribution_class=functools.partial(
            CompositeDistribution, distribution_map={"action1": torch.distributions.Categorical},
            name_map={"action1": ("action", "action1")},
        ),
    )


def composite_batch(batch):
    out = batch.exclude("action", "action_log_prob")
    out["action", "action1"] = batch["action"]
    out["action", "action1_log_prob"] = batch["action_log_prob"]
    return out


@pytest.mark.parametrize("aggregate,list_form", [(False, False), (False, True), (True, False)])
def test_composite_single_head_actor_matches_core(aggregate, list_form):
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    cfg = PPOConfig()
    with set_composite_lp_aggregate(aggregate):
        loss = MettaPPOLoss(composite_actor(actor), critic, cfg)
        log_prob_key = "sample_log_prob" if aggregate else ("action", "action1_log_prob")
        assert loss.tensor_keys.action == ("action", "action1")
        assert loss.tensor_keys.sample_log_prob == log_prob_key
        if list_form:  # TorchRL's way of naming the log-prob keys of a composite distribution
            loss.set_keys(action=[("action", "action1")], sample_log_prob=[log_prob_key])
        data = composite_batch(batch).exclude(("action", "action1_log_prob"))
        data[log_prob_key] = batch["action_log_prob"]
        out = loss(data)
    ref = core_terms(actor, critic, batch, cfg)
    close(total(out), ref.loss)
    params = list(actor.parameters())
    for mine, theirs in zip(torch.autograd.grad(total(out), params), torch.autograd.grad(ref.loss, params)):
        close(mine, theirs)


def test_composite_actor_with_several_log_prob_keys_is_refused():
    actor, critic = make_modules()
    with set_composite_lp_aggregate(False):
        loss = MettaPPOLoss(composite_actor(actor), critic)
        with pytest.raises(MettaError, match=r"sample_log_prob keys .*one log-prob per step"):
            loss.set_keys(sample_log_prob=[("action", "a_log_prob"), ("action", "b_log_prob")])


def test_keyword_call_and_select_out_keys_match_the_tensordict_call():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    with torch.no_grad():  # no recorded value in the call: the loss's estimator takes the critic's
        batch["state_value"] = critic(batch.select("observation"))["state_value"]
    loss = MettaPPOLoss(actor, critic)
    kwargs = {  # TorchRL's dispatch: in_keys with "_" for nesting
        "observation": batch["observation"], "action": batch["action"], "action_log_prob": batch["action_log_prob"],
        "next_reward": batch["next", "reward"], "next_terminated": batch["next", "terminated"],
        "next_done": batch["next", "done"], "next_observation": batch["next", "observation"],
    }
    values = loss(**kwargs)
    out = loss(batch)
    assert len(values) == len(loss.out_keys)
    for key, value in zip(loss.out_keys, values):
        close(value, out[key])
    close(sum(values[loss.out_keys.index(k)] for k in LOSS_KEYS), core_terms(actor, critic, batch, PPOConfig()).loss)

    loss.select_out_keys("loss_objective", "loss_critic")
    assert set(loss(batch).keys()) == {"loss_objective", "loss_critic"}
    objective, critic_loss = loss(**kwargs)
    close(objective, out["loss_objective"])
    close(critic_loss, out["loss_critic"])
    with pytest.raises(MettaError, match=r"unknown output\(s\) \['ESS'\]"):
        loss.out_keys = ["ESS"]


def shared_trunk(seed=0):
    """TorchRL's shared-trunk pattern: a trunk writes ``hidden``, actor and critic heads read it."""
    torch.manual_seed(seed)
    trunk = TensorDictModule(nn.Sequential(nn.Linear(OBS, 16), nn.Tanh()), in_keys=["observation"], out_keys=["hidden"])
    head = ProbabilisticActor(
        TensorDictModule(nn.Linear(16, ACTIONS), in_keys=["hidden"], out_keys=["logits"]),
        in_keys=["logits"], distribution_class=torch.distributions.Categorical, return_log_prob=True,
    )
    value_head = ValueOperator(nn.Linear(16, 1), in_keys=["hidden"])
    return ActorValueOperator(trunk, head, value_head)


def shared_core_terms(model, batch, cfg):
    """Metta's loss on the shared-trunk networks, by hand."""
    trunk, head, value_head = model.module[0].module, model.module[1].module[0].module, model.module[2].module
    hidden = trunk(batch["observation"])
    dist = torch.distributions.Categorical(logits=head(hidden))
    values, rewards, dones = metta_layout(batch)
    advantages = batch["advantage"]
    return ppo_minibatch_loss(
        cfg, old_logprob=batch["action_log_prob"], new_logprob=dist.log_prob(batch["action"]), entropy=dist.entropy(),
        new_values=value_head(hidden)[..., 0], values=values, rewards=rewards, dones=dones, advantages=advantages,
    )


@pytest.mark.parametrize("separate_losses", [False, True])
@pytest.mark.parametrize("critic_kind", ["value_operator", "value_head"])
def test_shared_trunk_matches_core_and_separate_losses_keeps_the_critic_off_the_trunk(critic_kind, separate_losses):
    model = shared_trunk()
    actor, ref_critic = make_modules()
    batch = make_batch(actor, ref_critic)
    batch["advantage"] = torch.randn(batch.batch_size, generator=torch.Generator().manual_seed(3))
    critic = model.get_value_operator() if critic_kind == "value_operator" else model.get_value_head()
    cfg = PPOConfig()
    loss = MettaPPOLoss(model.get_policy_operator(), critic, cfg, separate_losses=separate_losses)
    out = loss(batch)
    ref = shared_core_terms(model, batch, cfg)
    close(total(out), ref.loss)

    trunk = list(model.module[0].parameters())
    heads = [*model.module[1].parameters(), *model.module[2].parameters()]
    critic_grads = torch.autograd.grad(out["loss_critic"], trunk + heads, allow_unused=True, retain_graph=True)
    ref_critic_grads = torch.autograd.grad(ref.value_term, trunk + heads, allow_unused=True, retain_graph=True)
    for i, (mine, theirs) in enumerate(zip(critic_grads, ref_critic_grads)):
        if i < len(trunk) and separate_losses:
            assert mine is None or not mine.any()  # the critic loss does not reach the trunk
        else:
            close(torch.zeros(()) if mine is None else mine, torch.zeros(()) if theirs is None else theirs)
    policy = out["loss_objective"] + out["loss_entropy"]
    ref_policy = ref.policy_loss + ref.entropy_term
    for mine, theirs in zip(torch.autograd.grad(policy, trunk), torch.autograd.grad(ref_policy, trunk)):
        close(mine, theirs)


def test_actor_critic_wrapper_whose_critic_reads_the_actors_trunk_matches_core():
    """ActorCriticWrapper(actor, critic) where the actor's own trunk writes ``hidden`` and the critic
    reads it: the critic sees the actor's ``hidden`` (with its gradient)."""
    model = shared_trunk()
    trunk, head, value_head = model.module[0], model.module[1], model.module[2]
    actor = ProbabilisticActor(
        TensorDictSequential(trunk, head.module[0]), in_keys=["logits"],
        distribution_class=torch.distributions.Categorical, return_log_prob=True,
    )
    wrapper = ActorCriticWrapper(actor, value_head)
    ref_actor, ref_critic = make_modules()
    batch = make_batch(ref_actor, ref_critic)
    batch["advantage"] = torch.randn(batch.batch_size, generator=torch.Generator().manual_seed(3))
    loss = MettaPPOLoss(wrapper.get_policy_operator(), wrapper.get_value_operator())
    out = loss(batch)
    ref = shared_core_terms(model, batch, PPOConfig())
    close(total(out), ref.loss)
    params = list(model.parameters())
    for mine, theirs in zip(torch.autograd.grad(total(out), params), torch.autograd.grad(ref.loss, params)):
        close(mine, theirs)


ESTIMATORS = [ValueEstimators.TD0, ValueEstimators.TD1, ValueEstimators.TDLambda, ValueEstimators.GAE,
              ValueEstimators.VTrace, ValueEstimators.MAGAE]


@pytest.mark.parametrize("recorded_value", [True, False])
@pytest.mark.parametrize("value_type", ESTIMATORS)
def test_torchrl_estimators_with_or_without_a_recorded_value_match_core(value_type, recorded_value):
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    if not recorded_value:
        batch = batch.exclude("state_value")
    cfg = PPOConfig()
    loss = MettaPPOLoss(actor, critic, cfg).make_value_estimator(value_type)
    out = loss(batch)

    # reference: the same TorchRL estimator on a batch without the value (it evaluates the critic
    # itself), Metta's loss on its advantage and on the recorded value, else the critic's
    view = batch.exclude("state_value")
    with torch.no_grad():
        loss.value_estimator(view)
    advantages = view["advantage"][..., 0]
    values = (batch if recorded_value else view)["state_value"][..., 0]
    _, rewards, dones = metta_layout(view)
    dist = torch.distributions.Categorical(logits=actor.module[0].module(batch["observation"]))
    ref = ppo_minibatch_loss(
        cfg, old_logprob=batch["action_log_prob"], new_logprob=dist.log_prob(batch["action"]), entropy=dist.entropy(),
        new_values=critic.module(batch["observation"])[..., 0], values=values, rewards=rewards, dones=dones,
        advantages=advantages,
    )
    close(total(out), ref.loss)
    assert "state_value" not in batch.keys() or recorded_value  # the caller's batch is not written


@pytest.mark.parametrize(
    "clip_value,expected",
    [
        (True, {"clip_vloss": True, "vf_clip_coef": 0.2}),  # ClipPPOLoss: clip at clip_epsilon
        (False, {"clip_vloss": False}),
        (None, {"clip_vloss": False}),
        (0.0, {"clip_vloss": False}),
        (0.3, {"clip_vloss": True, "vf_clip_coef": 0.3}),
        (torch.tensor(0.3), {"clip_vloss": True, "vf_clip_coef": torch.tensor(0.3).item()}),  # float32 0.3
    ],
)
def test_clip_value_has_torchrl_meaning(clip_value, expected):
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    cfg = PPOConfig(clip_coef=0.2, vf_clip_coef=0.05).update(expected)
    loss = MettaPPOLoss(actor, critic, PPOConfig(vf_clip_coef=0.05), clip_epsilon=0.2, clip_value=clip_value)
    assert loss.config.model_dump() == cfg.model_dump()
    close(total(loss(batch)), core_terms(actor, critic, batch, cfg).loss)

    scheduled = MettaPPOLoss(actor, critic, PPOConfig(vf_clip_coef=0.05), clip_epsilon=0.2)
    scheduled.clip_value = clip_value  # the attribute has the same meaning
    assert scheduled.config.model_dump() == cfg.model_dump()
    assert (scheduled.clip_value is None) is (not cfg.clip_vloss)


@pytest.mark.parametrize("kwargs", [{}, {"reduction": None}, {"reduction": "mean"}, {"device": "cpu"},
                                    {"separate_losses": True}, {"functional": False}])
def test_torchrl_constructor_arguments_keep_the_numbers(kwargs):
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    loss = MettaPPOLoss(actor, critic, **kwargs)
    close(total(loss(batch)), core_terms(actor, critic, batch, PPOConfig()).loss)


def test_torchrl_coefficient_names_reach_metta_buffers():
    actor, critic = make_modules()
    loss = MettaPPOLoss(actor, critic, entropy_coeff=0.02, critic_coeff=0.5)
    loss.clip_epsilon = 0.25
    assert float(loss.clip_coef) == 0.25 and float(loss.clip_epsilon) == 0.25
    assert float(loss.entropy_coeff) == float(loss.ent_coef) == 0.02
    assert loss.config.model_dump() == PPOConfig(ent_coef=0.02, vf_coef=0.5, clip_coef=0.25).model_dump()


def test_missing_value_with_an_advantage_is_a_key_error_and_a_metta_error():
    actor, critic = make_modules()
    batch = make_batch(actor, critic).exclude("state_value")
    batch["advantage"] = torch.zeros(batch.batch_size)
    with pytest.raises(KeyError) as info:
        MettaPPOLoss(actor, critic)(batch)
    assert isinstance(info.value, MettaError)
    assert str(info.value).startswith("clip_value is set to 0.1, but the key state_value was not found")


def test_separate_losses_without_functional_refuses_shared_parameters():
    model = shared_trunk()
    with pytest.raises(MettaError, match=r"separate_losses=True with functional=False .*2 parameter\(s\).*functional=True"):
        MettaPPOLoss(model.get_policy_operator(), model.get_value_operator(), separate_losses=True, functional=False)
    MettaPPOLoss(model.get_policy_operator(), model.get_value_head(), separate_losses=True, functional=False)
