"""MettaPPOLoss against the core's ppo_minibatch_loss and the loop reference; keys; bad input; state."""

import pytest
import torch

from bridges.torchrl import MettaAdvantage, MettaPPOLoss
from metta_core.advantage import compute_advantage
from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import ppo_minibatch_loss
from tests.reference import ppo_terms
from tests.torchrl.helpers import make_batch, make_modules, metta_layout

LOSS_KEYS = ("loss_objective", "loss_critic", "loss_entropy")


def total(out):
    return sum(out[k] for k in LOSS_KEYS)


def core_terms(actor, critic, batch, cfg, advantages=None, prio_weights=None, log_prob_key="action_log_prob"):
    """The core's numbers computed directly from the networks (Metta layout by hand)."""
    values, rewards, dones = metta_layout(batch)
    if advantages is None:
        advantages = compute_advantage(values, rewards, dones, torch.ones_like(values), gamma=cfg.gamma,
                                       gae_lambda=cfg.gae_lambda, rho_clip=cfg.vtrace.rho_clip, c_clip=cfg.vtrace.c_clip)
    logits = actor.module[0].module(batch["observation"])
    dist = torch.distributions.Categorical(logits=logits)
    new_values = critic.module(batch["observation"])[..., 0]
    return ppo_minibatch_loss(
        cfg, old_logprob=batch[log_prob_key], new_logprob=dist.log_prob(batch["action"]), entropy=dist.entropy(),
        new_values=new_values, values=values, rewards=rewards, dones=dones, advantages=advantages,
        prio_weights=prio_weights,
    )


@pytest.mark.parametrize("functional", [True, False])
@pytest.mark.parametrize("cfg", [PPOConfig(), PPOConfig(clip_vloss=False, norm_adv=False, ent_coef=0.05),
                                 PPOConfig().update({"vtrace.rho_clip": 0.8, "vtrace.c_clip": 1.5, "gamma": 0.9})])
def test_terms_and_gradients_match_core(cfg, functional):
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    loss = MettaPPOLoss(actor, critic, cfg, functional=functional)
    assert loss.functional is functional and (loss.actor_network_params is None) is not functional
    params = list(loss.parameters())
    assert {id(p) for p in params} == {id(p) for p in [*actor.parameters(), *critic.parameters()]}

    out = loss(batch)
    ref = core_terms(actor, critic, batch, cfg)
    assert torch.allclose(out["loss_objective"], ref.policy_loss, atol=1e-6)
    assert torch.allclose(out["loss_critic"], cfg.vf_coef * ref.value_loss, atol=1e-6)
    assert torch.allclose(out["loss_entropy"], -cfg.ent_coef * ref.entropy, atol=1e-6)
    assert torch.allclose(total(out), ref.loss, atol=1e-6)
    for mine, core in [("policy_loss", "policy_loss"), ("value_loss", "value_loss"), ("entropy", "entropy"),
                       ("approx_kl", "approx_kl"), ("kl_approx", "approx_kl"), ("clipfrac", "clipfrac"),
                       ("clip_fraction", "clipfrac"), ("importance", "importance")]:
        assert torch.allclose(out[mine], getattr(ref, core), atol=1e-6), mine

    grads = torch.autograd.grad(total(out), params)
    ref_grads = torch.autograd.grad(ref.loss, params)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6)


def test_functional_and_plain_losses_share_the_networks_parameters():
    """convert_to_functional keeps the networks' parameters (no copy): both losses follow an in-place change."""
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    functional, plain = MettaPPOLoss(actor, critic), MettaPPOLoss(actor, critic, functional=False)
    before = total(plain(batch)).detach()
    with torch.no_grad():
        functional.actor_network_params.apply(lambda p: p.mul_(0.5))  # the shared parameters change in place
    assert not torch.allclose(total(plain(batch)), before)
    torch.testing.assert_close(total(functional(batch)), total(plain(batch)))


def test_loss_matches_loop_reference():
    """Independent check: the element-by-element SPEC reference of tests/reference.py."""
    cfg = PPOConfig()
    actor, critic = make_modules(seed=3)
    batch = make_batch(actor, critic, B=3, T=10, seed=4)
    out = MettaPPOLoss(actor, critic, cfg)(batch)
    values, rewards, dones = metta_layout(batch)
    a0 = compute_advantage(values, rewards, dones, torch.ones_like(values), gamma=cfg.gamma, gae_lambda=cfg.gae_lambda)
    dist = torch.distributions.Categorical(logits=actor.module[0].module(batch["observation"]))
    ref = ppo_terms(cfg, batch["action_log_prob"], dist.log_prob(batch["action"]), dist.entropy(),
                    critic.module(batch["observation"])[..., 0], values, rewards, dones, a0)
    assert torch.allclose(total(out), ref["loss"], atol=1e-5)
    assert torch.allclose(out["policy_loss"], ref["policy_loss"], atol=1e-5)
    assert torch.allclose(out["value_loss"], ref["value_loss"], atol=1e-5)


def test_advantage_key_and_priority_weight_are_used():
    cfg = PPOConfig()
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    g = torch.Generator().manual_seed(7)
    given_adv = torch.randn(4, 8, generator=g)
    prio = torch.rand(4, 1, generator=g) + 0.5
    batch["advantage"] = given_adv.unsqueeze(-1)
    batch["priority_weight"] = prio.expand(4, 8)
    out = MettaPPOLoss(actor, critic, cfg)(batch)
    ref = core_terms(actor, critic, batch, cfg, advantages=given_adv, prio_weights=prio)
    assert torch.allclose(total(out), ref.loss, atol=1e-6)
    assert torch.allclose(out["policy_loss"], ref.policy_loss, atol=1e-6)


def test_index_shift_last_reward_unused_and_truncation_ignored():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    loss = MettaPPOLoss(actor, critic)
    base = loss(batch)
    changed = batch.clone()
    changed["next", "reward"][:, -1] += 100.0  # the last step's reward has no Metta column
    changed["next", "done"] = ~changed["next", "done"]  # only the terminal flag is read
    changed["next", "truncated"] = ~changed["next", "truncated"]
    again = loss(changed)
    for k in (*LOSS_KEYS, "explained_variance"):
        assert torch.equal(base[k], again[k]), k
    changed["next", "reward"][:, 0] += 1.0  # follows action 0: Metta's rewards[:, 1]
    assert not torch.equal(loss(changed)["loss_critic"], base["loss_critic"])


def test_set_keys_remapping_gives_same_numbers():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    reference = MettaPPOLoss(actor, critic)(batch)

    actor2, critic2 = make_modules(value_key="v_old", log_prob_key="logp")
    renamed = make_batch(actor2, critic2, log_prob_key="logp", value_key="v_old", reward_key="r")
    loss = MettaPPOLoss(actor2, critic2)
    assert loss.tensor_keys.sample_log_prob == "logp"  # taken from the actor's log_prob_keys
    loss.set_keys(value="v_old", reward="r", advantage="adv0", value_target="ret")
    assert loss.value_estimator.tensor_keys.reward == "r"  # remapping reaches the estimator
    out = loss(renamed)
    for k in (*LOSS_KEYS, "entropy", "approx_kl", "explained_variance"):
        assert torch.equal(out[k], reference[k]), k


def test_unknown_set_keys_name_lists_accepted():
    actor, critic = make_modules()
    with pytest.raises(MettaError, match=r"unknown key name\(s\) \['rewards'\].*'reward'.*'priority_weight'"):
        MettaPPOLoss(actor, critic).set_keys(rewards="r")


def test_coefficients_are_schedulable_buffers_with_torchrl_aliases():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    loss = MettaPPOLoss(actor, critic, entropy_coeff=0.03, clip_epsilon=0.2)
    assert loss.config.ent_coef == 0.03 and loss.config.clip_coef == 0.2
    loss.entropy_coeff = 0.1
    loss.critic_coeff = 0.5
    loss.clip_value = 0.3
    assert float(loss.ent_coef) == 0.1 and "ent_coef" in dict(loss.named_buffers())
    cfg = PPOConfig(ent_coef=0.1, vf_coef=0.5, clip_coef=0.2, vf_clip_coef=0.3)
    assert loss.config == cfg
    out = loss(batch)
    assert torch.allclose(total(out), core_terms(actor, critic, batch, cfg).loss, atol=1e-6)
    loss.ent_coef = -1.0
    with pytest.raises(MettaError, match="ent_coef"):
        loss(batch)
    with pytest.raises(MettaError, match="clip_cof"):
        MettaPPOLoss(actor, critic, clip_cof=0.2)


def test_estimator_swap():
    from torchrl.objectives.utils import ValueEstimators
    from torchrl.objectives.value import GAE, TDLambdaEstimator, VTrace

    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    loss = MettaPPOLoss(actor, critic)
    assert isinstance(loss.value_estimator, MettaAdvantage)
    metta = loss(batch)

    loss.make_value_estimator(ValueEstimators.GAE)
    assert isinstance(loss.value_estimator, GAE)
    assert float(loss.value_estimator.lmbda) == pytest.approx(loss.config.gae_lambda)
    gae_td = batch.clone()
    loss.first_pass(gae_td)
    gae = loss(batch)
    cfg = loss.config
    assert torch.allclose(total(gae), core_terms(actor, critic, batch, cfg, advantages=gae_td["advantage"][..., 0]).loss,
                          atol=1e-6)
    assert not torch.equal(gae["loss_critic"], metta["loss_critic"])

    loss.make_value_estimator(ValueEstimators.TDLambda)
    assert isinstance(loss.value_estimator, TDLambdaEstimator)
    assert torch.isfinite(total(loss(batch)))
    loss.make_value_estimator(ValueEstimators.VTrace)
    assert isinstance(loss.value_estimator, VTrace)
    assert torch.isfinite(total(loss(batch)))

    loss.make_value_estimator(MettaAdvantage, gamma=0.9)  # keeps first pass and recompute consistent
    assert loss.config.gamma == 0.9 and loss.value_estimator.gamma == 0.9
    instance = MettaAdvantage(gamma=0.977, gae_lambda=0.891477, value_network=critic)
    loss.make_value_estimator(instance)
    assert loss.value_estimator is instance
    with pytest.raises(MettaError, match="unknown hyperparameter"):
        loss.make_value_estimator(MettaAdvantage, lmbda=0.9)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda td: td.del_("action_log_prob"), r"'action_log_prob'.*loss\.set_keys\(sample_log_prob="),
        (lambda td: td.del_(("next", "reward")), r"\('next', 'reward'\).*loss\.set_keys\(reward="),
        (lambda td: td.del_(("next", "terminated")), r"terminated.*set_keys\(terminated="),
        (lambda td: td.set(("next", "reward"), td["next", "reward"].double()), r"float64, expected torch\.float32"),
        (lambda td: td.set(("next", "reward"), torch.ones(4, 8, 1, dtype=torch.long)), r"int64, expected torch\.float32"),
        (lambda td: td["next", "reward"].__setitem__((0, 2), float("nan")), r"non-finite.*'reward'"),
        (lambda td: td["state_value"].__setitem__((1, 3), float("inf")), r"non-finite.*'state_value'"),
    ],
)
def test_bad_input_raises_clear_error(mutate, match):
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    batch["advantage"] = torch.zeros(4, 8)  # so the loss itself (not the estimator) reads every key
    mutate(batch)
    with pytest.raises(MettaError, match=match):
        MettaPPOLoss(actor, critic)(batch)


def test_missing_value_names_the_key_and_the_set_keys_call():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    batch["advantage"] = torch.zeros(4, 8)
    batch.del_("state_value")
    with pytest.raises(MettaError, match=r"'state_value'.*loss\.set_keys\(value="):
        MettaPPOLoss(actor, critic)(batch)


def test_value_filled_by_critic_when_missing():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    batch.del_("state_value")
    out = MettaPPOLoss(actor, critic)(batch)
    assert torch.isfinite(total(out))


def test_layout_errors():
    actor, critic = make_modules()
    loss = MettaPPOLoss(actor, critic)
    batch = make_batch(actor, critic)
    batch.refine_names(None, "time")
    assert torch.isfinite(total(loss(batch)))
    with pytest.raises(MettaError, match=r"\[T, B\].*transpose\(0, 1\)"):
        loss(batch.transpose(0, 1))
    with pytest.raises(MettaError, match="ambiguous"):
        loss(make_batch(actor, critic).refine_names("env", "step"))
    with pytest.raises(MettaError, match=r"expected a \[B, T\].*unsqueeze\(0\)"):
        loss(make_batch(actor, critic)[0])
    with pytest.raises(MettaError, match="expected a \\[B, T\\]"):
        loss(make_batch(actor, critic).reshape(2, 2, 8))
    with pytest.raises(MettaError, match="empty batch"):
        loss(make_batch(actor, critic)[:0])


def test_state_dict_round_trip_restores_tracker_beta_and_config():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    loss = MettaPPOLoss(actor, critic, ent_coef=0.02)
    loss(batch)
    loss(batch)
    loss.anneal_beta = 0.75
    loss.phase_stats.values["explained_variance"] = [0.5]
    state = loss.state_dict()
    actor2, critic2 = make_modules(seed=9)
    other = MettaPPOLoss(actor2, critic2)
    other.load_state_dict(state)
    assert other.stats() == loss.stats()
    assert other.config == loss.config and float(other.anneal_beta) == 0.75
    assert torch.equal(other(batch)["loss_objective"], loss(batch)["loss_objective"])
    with pytest.raises(MettaError, match="extra state"):
        other.set_extra_state({"tracker": {}})


def test_target_kl_reached():
    actor, critic = make_modules()
    batch = make_batch(actor, critic)
    loss = MettaPPOLoss(actor, critic, target_kl=1e-6)
    assert not loss.target_kl_reached(0) and not loss.target_kl_reached(1)
    loss(batch)
    assert not loss.target_kl_reached(0) and loss.target_kl_reached(1)


def test_non_probabilistic_actor_rejected():
    _, critic = make_modules()
    with pytest.raises(MettaError, match="ProbabilisticTensorDictSequential"):
        MettaPPOLoss(torch.nn.Linear(3, 3), critic)


def test_continuous_actor_with_independent_normal():
    from tensordict.nn import NormalParamExtractor, TensorDictModule
    from torchrl.modules import ProbabilisticActor
    from torchrl.modules.distributions import IndependentNormal

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), NormalParamExtractor())
    actor = ProbabilisticActor(TensorDictModule(net, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                               distribution_class=IndependentNormal, return_log_prob=True)
    _, critic = make_modules()
    batch = make_batch(*make_modules())
    batch["action"] = torch.randn(4, 8, 2)
    batch["action_log_prob"] = torch.randn(4, 8) - 2
    out = MettaPPOLoss(actor, critic)(batch)
    total(out).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_padding_steps_of_split_trajectories_are_refused():
    """TorchRL's ``("collector", "mask")`` marks padding (split_trajs=True): Metta's rows are real steps."""
    actor, critic = make_modules()
    loss = MettaPPOLoss(actor, critic)
    batch = make_batch(actor, critic)
    batch.set(("collector", "mask"), torch.ones(batch.batch_size, dtype=torch.bool))
    loss(batch)  # every step real: accepted
    batch["collector", "mask"][0, -2:] = False
    with pytest.raises(MettaError, match=r"marks 2 padding step.*split_trajs=False"):
        loss(batch)
