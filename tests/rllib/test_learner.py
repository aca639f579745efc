"""MettaPPOLearner against metta_core, without starting Ray."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from bridges.rllib import MettaColumns, MettaLayoutConnector, MettaSelfSupervisedLoss, metta_settings
from metta_core.ppo_math import anneal_beta, ppo_minibatch_loss, prioritized_sample
from tests.rllib.conftest import HORIZON, SEGMENTS, as_multi_agent, build, layout_batch, make_config


class MettaLossModule(MettaSelfSupervisedLoss, DefaultPPOTorchRLModule):
    """RLlib's default PPO module carrying the Metta loss (SelfSupervisedLossAPI)."""


def rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, HORIZON, *x.shape[1:])


def core_terms(module, batch, idx, prio_w, ppo):
    """The core side: forward the policy on the chosen rows, then ``ppo_minibatch_loss``."""
    mb = {c: rows(v)[idx].reshape(-1, *v.shape[1:]) for c, v in batch.items()}
    out = module.forward_train({Columns.OBS: mb[Columns.OBS]})
    dist = module.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    return ppo_minibatch_loss(
        ppo,
        old_logprob=rows(mb[Columns.ACTION_LOGP]),
        new_logprob=rows(dist.logp(mb[Columns.ACTIONS])),
        entropy=rows(dist.entropy()),
        new_values=rows(module.compute_values(mb, embeddings=out[Columns.EMBEDDINGS])),
        values=rows(mb[Columns.VF_PREDS]),
        rewards=rows(mb[Columns.REWARDS]),
        dones=rows(mb[Columns.TERMINATEDS]),
        advantages=rows(mb[Columns.ADVANTAGES]),
        prio_weights=prio_w,
        mask=rows(mb[Columns.LOSS_MASK]),
    )


def sample(learner, batch, beta):
    gen = torch.Generator()
    gen.set_state(learner._metta_generator.get_state())
    prio = learner._metta_ppo.prioritized_experience_replay
    return prioritized_sample(
        rows(batch[Columns.ADVANTAGES]), SEGMENTS, prio_alpha=prio.prio_alpha, prio_beta=beta, generator=gen
    )


def learner_minibatch(batch, idx, prio_w):
    mb = {c: rows(v)[idx].reshape(-1, *v.shape[1:]) for c, v in batch.items()}
    mb[MettaColumns.PRIO_WEIGHTS] = prio_w.expand(-1, HORIZON).reshape(-1)
    return mb


def test_loss_terms_equal_core(learner):
    batch = layout_batch(learner)
    idx, prio_w = sample(learner, batch, 0.6)
    mb = learner_minibatch(batch, idx, prio_w)
    fwd = learner.module.forward_train({DEFAULT_MODULE_ID: mb})
    loss = learner.compute_losses(fwd_out=fwd, batch={DEFAULT_MODULE_ID: mb})[DEFAULT_MODULE_ID]
    tracked = learner._metta_stats[DEFAULT_MODULE_ID].values
    core = core_terms(learner.module[DEFAULT_MODULE_ID].unwrapped(), batch, idx, prio_w, learner._metta_ppo)
    assert abs(float(loss.detach()) - float(core.loss.detach())) <= 1e-6
    for name, value in core.stats().items():
        assert tracked[name] == [pytest.approx(value, abs=1e-6)], name
    assert 0.0 < core.stats()["clipfrac"] < 1.0  # the stored log-probs make the ratio non-trivial


@pytest.mark.parametrize("prio_alpha", [0.0, 0.7])
def test_update_equals_core_step(prio_alpha):
    learner = build(make_config(**{"prioritized_experience_replay.prio_alpha": prio_alpha}, total_timesteps=320))
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    core_module = copy.deepcopy(module)
    optimizer = torch.optim.Adam(core_module.parameters(), lr=1e-3, eps=1e-12)
    batch = layout_batch(learner, seed=1)
    ppo = learner._metta_ppo
    for epoch in range(2):  # two phases: beta anneals with the trainer epoch
        beta = anneal_beta(
            epoch, total_timesteps=320, batch_size=SEGMENTS * HORIZON, prio_alpha=prio_alpha,
            prio_beta0=ppo.prioritized_experience_replay.prio_beta0,
        )
        idx, prio_w = sample(learner, batch, beta)
        core = core_terms(core_module, batch, idx, prio_w, ppo)
        optimizer.zero_grad()
        core.loss.backward()
        torch.nn.utils.clip_grad_norm_(list(core_module.parameters()), ppo.max_grad_norm)
        optimizer.step()
        results = learner.update(batch=as_multi_agent(batch))
        assert results[DEFAULT_MODULE_ID]["anneal_beta"].peek() == pytest.approx(beta)
        assert results[DEFAULT_MODULE_ID]["policy_loss"].peek() == pytest.approx(float(core.policy_loss.detach()), abs=1e-6)
        assert results[DEFAULT_MODULE_ID]["vf_loss"].peek() == pytest.approx(float(core.value_loss.detach()), abs=1e-6)
        for (name, p), q in zip(module.named_parameters(), core_module.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert prio_alpha == 0 or beta > 0.6


def test_target_kl_stops_phase_after_first_step():
    """target_kl below any approx_kl: minibatch 0 steps, minibatch 1 is only evaluated, the phase ends."""
    learner = build(make_config(minibatch_size=2 * HORIZON, update_epochs=3, target_kl=1e-12))
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    core_module = copy.deepcopy(module)
    optimizer = torch.optim.Adam(core_module.parameters(), lr=1e-3, eps=1e-12)
    batch = layout_batch(learner, seed=2)
    gen = torch.Generator()
    gen.set_state(learner._metta_generator.get_state())
    idx, prio_w = prioritized_sample(rows(batch[Columns.ADVANTAGES]), 2, prio_alpha=0.0, prio_beta=0.6, generator=gen)
    core = core_terms(core_module, batch, idx, prio_w, learner._metta_ppo)
    optimizer.zero_grad()
    core.loss.backward()
    torch.nn.utils.clip_grad_norm_(list(core_module.parameters()), learner._metta_ppo.max_grad_norm)
    optimizer.step()
    learner.update(batch=as_multi_agent(batch))
    assert len(learner._metta_stats[DEFAULT_MODULE_ID].values["approx_kl"]) == 2  # stepped one, evaluated one
    for p, q in zip(module.parameters(), core_module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_accumulation_steps_once_per_group():
    """minibatch_size = 2 * max_minibatch_size: accumulate 2 minibatches per optimizer step (SPEC §4.8)."""
    learner = build(make_config(minibatch_size=4 * HORIZON, max_minibatch_size=2 * HORIZON))
    assert learner._metta_trainer.sizes["accumulate_minibatches"] == 2
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    core_module = copy.deepcopy(module)
    optimizer = torch.optim.Adam(core_module.parameters(), lr=1e-3, eps=1e-12)
    batch = layout_batch(learner, seed=3)
    gen = torch.Generator()
    gen.set_state(learner._metta_generator.get_state())
    optimizer.zero_grad()
    for _ in range(2):
        idx, prio_w = prioritized_sample(
            rows(batch[Columns.ADVANTAGES]), 2, prio_alpha=0.0, prio_beta=0.6, generator=gen
        )
        core_terms(core_module, batch, idx, prio_w, learner._metta_ppo).loss.backward()
    torch.nn.utils.clip_grad_norm_(list(core_module.parameters()), learner._metta_ppo.max_grad_norm)
    optimizer.step()
    learner.update(batch=as_multi_agent(batch))
    for p, q in zip(module.parameters(), core_module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_self_supervised_loss_path_equals_learner_path(learner):
    config = make_config().rl_module(rl_module_spec=RLModuleSpec(module_class=MettaLossModule))
    ssl_learner = build(config)
    ssl_learner.module.set_state(learner.module.get_state())
    batch = layout_batch(learner, seed=4)
    idx, prio_w = sample(learner, batch, 0.6)
    mb = learner_minibatch(batch, idx, prio_w)
    losses = []
    for lrn in (learner, ssl_learner):
        fwd = lrn.module.forward_train({DEFAULT_MODULE_ID: mb})
        losses.append(lrn.compute_losses(fwd_out=fwd, batch={DEFAULT_MODULE_ID: mb})[DEFAULT_MODULE_ID])
    assert isinstance(ssl_learner.module[DEFAULT_MODULE_ID].unwrapped(), MettaSelfSupervisedLoss)
    assert float(losses[0].detach()) == float(losses[1].detach())
    assert {m: s.state_dict() for m, s in learner._metta_stats.items()} == {
        m: s.state_dict() for m, s in ssl_learner._metta_stats.items()
    }


def test_stock_learner_calls_module_loss():
    """RLlib's own PPOTorchLearner, with the Metta module and connector, gets the core's loss."""
    base = make_config()
    config = base.rl_module(rl_module_spec=RLModuleSpec(module_class=MettaLossModule)).learners(
        learner_class=PPOTorchLearner, learner_connector=lambda *_: MettaLayoutConnector.from_config(base)
    )
    stock = build(config)
    assert type(stock) is PPOTorchLearner
    module = stock.module[DEFAULT_MODULE_ID].unwrapped()
    batch = layout_batch(stock, seed=5)
    fwd = stock.module.forward_train({DEFAULT_MODULE_ID: batch})
    loss = stock.compute_losses(fwd_out=fwd, batch={DEFAULT_MODULE_ID: batch})[DEFAULT_MODULE_ID]
    core = core_terms(module, batch, torch.arange(SEGMENTS), None, metta_settings(stock.config)[0])
    assert abs(float(loss.detach()) - float(core.loss.detach())) <= 1e-6
    before = [p.detach().clone() for p in module.parameters()]
    results = stock.update(batch=as_multi_agent(batch), minibatch_size=SEGMENTS * HORIZON, num_epochs=1)
    assert results[DEFAULT_MODULE_ID]["policy_loss"].peek() == pytest.approx(float(core.policy_loss.detach()), abs=1e-6)
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_state_round_trip_resumes_identically(tmp_path):
    config = make_config(minibatch_size=2 * HORIZON, update_epochs=2)
    first = build(config)
    batch = layout_batch(first, seed=6)
    first.update(batch=as_multi_agent(batch))
    first.save_to_path(tmp_path / "learner")
    resumed = build(config)
    resumed.restore_from_path(tmp_path / "learner")
    state = resumed.get_state()["metta_loss"]
    assert state["epoch"] == 1
    np.testing.assert_array_equal(state["generator"], first.get_state()["metta_loss"]["generator"])
    for lrn in (first, resumed):
        lrn.update(batch=as_multi_agent(batch))
    for p, q in zip(first.module[DEFAULT_MODULE_ID].parameters(), resumed.module[DEFAULT_MODULE_ID].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
