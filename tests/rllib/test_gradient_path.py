"""MettaPPOLearner's step goes through RLlib's gradient path with Metta's numbers (no Ray)."""

from __future__ import annotations

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from bridges.rllib.learner import MettaPPOLearner
from tests.rllib.conftest import HORIZON, as_multi_agent, build, layout_batch, make_config

NORM_KEY = "gradients_default_optimizer_global_norm"


class DirectStepLearner(MettaPPOLearner):
    """Reference: Metta's step without RLlib's hooks (backward into .grad, clip_grad_norm_, Adam step)."""

    def _gradient_step(self, module_id, loss):
        if loss is not None:
            loss.backward()
        params = [p for p in self.get_parameters(self.module[module_id]) if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self._metta_ppo.max_grad_norm)
        for _, opt in self.get_optimizers_for_module(module_id):
            opt.step()


class CountingLearner(MettaPPOLearner):
    """A user's hook overrides: counted, and the postprocessing scales the clipped gradients by 0."""

    calls: list

    def compute_gradients(self, loss_per_module, **kwargs):
        self.calls.append("compute")
        return super().compute_gradients(loss_per_module, **kwargs)

    def postprocess_gradients(self, gradients_dict):
        self.calls.append("postprocess")
        return {ref: grad * 0.0 for ref, grad in super().postprocess_gradients(gradients_dict).items()}

    def apply_gradients(self, gradients_dict):
        self.calls.append("apply")
        super().apply_gradients(gradients_dict)


def accumulating_config(**fields):
    """2 minibatches of 2 segments per step (accumulate_minibatches = 2), 2 steps per epoch, 2 epochs."""
    return make_config(minibatch_size=4 * HORIZON, max_minibatch_size=2 * HORIZON, update_epochs=2,
                       target_kl=None, **fields)


def params_of(learner):
    return [p.detach().clone() for p in learner.module[DEFAULT_MODULE_ID].unwrapped().parameters()]


@pytest.mark.parametrize("max_grad_norm", [0.5, 1e-3])  # 1e-3: every step is clipped
def test_rllib_path_gives_the_direct_steps_numbers_exactly(max_grad_norm):
    rllib = build(accumulating_config(max_grad_norm=max_grad_norm))
    direct = build(accumulating_config(max_grad_norm=max_grad_norm).learners(learner_class=DirectStepLearner))
    assert rllib._metta_trainer.sizes["accumulate_minibatches"] == 2
    assert rllib._metta_trainer.sizes["num_minibatches"] == 2
    for a, b in zip(params_of(rllib), params_of(direct)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for seed in range(2):
        batch = layout_batch(rllib, seed=seed)
        rllib.update(batch=as_multi_agent(batch))
        direct.update(batch=as_multi_agent(batch))
        for a, b in zip(params_of(rllib), params_of(direct)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hooks_run_once_per_step_and_the_global_norm_is_logged():
    learner = build(accumulating_config().learners(learner_class=CountingLearner))
    learner.calls = []
    before = params_of(learner)
    results = learner.update(batch=as_multi_agent(layout_batch(learner, seed=4)))
    # 2 epochs x 1 step (2 minibatches accumulated per step)
    assert learner.calls == ["compute", "postprocess", "apply"] * 2
    for a, b in zip(before, params_of(learner)):  # the override zeroed every gradient: Adam does not move
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(results[DEFAULT_MODULE_ID][NORM_KEY].peek()) > 0


def test_logged_norm_is_the_norm_before_clipping():
    learner = build(make_config(max_grad_norm=1e-3, target_kl=None))
    grads = {}
    original = learner.postprocess_gradients

    def probe(gradients_dict):
        grads["norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients_dict.values()])))
        return original(gradients_dict)

    learner.postprocess_gradients = probe
    results = learner.update(batch=as_multi_agent(layout_batch(learner, seed=5)))
    assert float(results[DEFAULT_MODULE_ID][NORM_KEY].peek()) == pytest.approx(grads["norm"], rel=1e-6)
    assert grads["norm"] > 1e-3  # it was clipped
