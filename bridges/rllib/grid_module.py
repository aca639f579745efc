"""``GridCNNModule``: the core's ``GridCNN`` (MettaGrid's grid policy) as an RLlib ``TorchRLModule``.

The module holds a ``metta_core.cnn_policy.GridCNN`` as ``net``, built in ``setup`` under
``torch.manual_seed(model_config["seed"])`` (the global RNG state is restored after), so its
initial weights are those of the core run with the same seed (``CoreRun`` seeds torch, then
builds the policy). ``model_config["feature_scale"]`` is the grid's per-channel normalization
(``MettaGridMultiAgentEnv.feature_scale``). The trunk runs once per forward: its output is
``Columns.EMBEDDINGS`` of the training forward, which ``compute_values`` reuses. The sampling
forward returns the logits and the values ``Columns.VF_PREDS`` (the critic head on the same trunk
output, nearly free): RLlib's env runner stores them with every step in the episodes'
``extra_model_outputs``, and ``MettaLayoutConnector`` takes them as the buffer's values, as Metta
stores the rollout's values, instead of a value pass over the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from metta_core.cnn_policy import GridCNN, grid_features


class GridCNNModule(TorchRLModule, ValueFunctionAPI):
    """``GridCNN`` with RLlib's module API: Categorical logits and ``ValueFunctionAPI``.

    ``model_config``: ``seed`` (int, default 0), ``feature_scale`` (one number per channel, default
    ones); ``channels`` and ``hidden`` as ``GridCNN``'s.
    """

    def setup(self) -> None:
        config = self.model_config or {}
        scale = config.get("feature_scale")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.get("seed", 0)))
            self.net = GridCNN(
                self.observation_space, self.action_space,
                None if scale is None else np.asarray(scale, np.float32),
                channels=tuple(config.get("channels", (32, 64))), hidden=int(config.get("hidden", 128)),
            )

    def _embed(self, batch) -> torch.Tensor:
        return grid_features(self.net.trunk, self.net.inv_scale, batch[Columns.OBS])

    def _forward(self, batch, **kwargs):
        hidden = self._embed(batch)
        return {Columns.ACTION_DIST_INPUTS: self.net.actor(hidden), Columns.VF_PREDS: self.compute_values(batch, hidden)}

    def _forward_train(self, batch, **kwargs):
        hidden = self._embed(batch)
        return {Columns.ACTION_DIST_INPUTS: self.net.actor(hidden), Columns.EMBEDDINGS: hidden}

    def compute_values(self, batch, embeddings=None):
        hidden = self._embed(batch) if embeddings is None else embeddings
        return self.net.critic(hidden).squeeze(-1)

    def get_train_action_dist_cls(self):
        return TorchCategorical

    get_inference_action_dist_cls = get_train_action_dist_cls
    get_exploration_action_dist_cls = get_train_action_dist_cls
