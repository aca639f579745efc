"""ActorCritic's discrete head against torch.distributions.Categorical, to the bit."""

import gymnasium as gym
import torch
from tensordict import TensorDict

from metta_core.policy import ActorCritic, categorical_terms


def _logits(seed, shape=(37, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).requires_grad_(True)


def test_sampled_terms_match_categorical_values_and_rng_draws():
    logits = _logits(0)
    torch.manual_seed(11)
    dist = torch.distributions.Categorical(logits=logits)
    expected = dist.sample()
    expected_next_draw = torch.rand(3)
    expected_terms = (dist.log_prob(expected), dist.entropy())
    torch.manual_seed(11)
    action, log_prob, entropy = categorical_terms(logits)
    assert torch.equal(torch.rand(3), expected_next_draw)  # as many draws from the global RNG
    assert torch.equal(action, expected)
    assert torch.equal(log_prob, expected_terms[0]) and torch.equal(entropy, expected_terms[1])


def test_given_action_terms_match_categorical_gradients():
    action = torch.randint(0, 5, (4, 37), generator=torch.Generator().manual_seed(1))[0]
    grads = []
    for terms in (
        lambda x: (lambda d: (d.log_prob(action), d.entropy()))(torch.distributions.Categorical(logits=x)),
        lambda x: categorical_terms(x, action)[1:],
    ):
        x = _logits(2)
        log_prob, entropy = terms(x)
        (log_prob.exp().mul(torch.linspace(-1, 1, 37)).sum() - 0.01 * entropy.sum()).backward()
        grads.append((log_prob.detach(), entropy.detach(), x.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_forward_writes_the_policy_contract_keys():
    env_obs = gym.spaces.Box(-1, 1, (4,))
    torch.manual_seed(0)
    policy = ActorCritic(env_obs, gym.spaces.Discrete(3), (8,))
    obs = torch.randn(2, 5, 4)
    td = policy(TensorDict({"env_obs": obs}, batch_size=[2, 5]))
    assert td["actions"].shape == (2, 5) and td["actions"].dtype == torch.long
    dist = torch.distributions.Categorical(logits=policy.actor(obs.reshape(-1, 4)))
    assert torch.equal(td["act_log_prob"], dist.log_prob(td["actions"].reshape(-1)).reshape(2, 5))
    assert torch.equal(td["entropy"], dist.entropy().reshape(2, 5))
