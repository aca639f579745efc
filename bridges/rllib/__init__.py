"""Metta's PPO on RLlib's new API stack: learner, layout connector, module loss mixin, config, and
MettaGrid as a ``MultiAgentEnv`` with the core's ``GridCNN`` as an RLModule.

    from bridges.rllib import metta_ppo_config
    algo = metta_ppo_config("CartPole-v1", batch_size=4096, bptt_horizon=16).build_algo()

See bridges/rllib/README.md for the layout and the mapping of Metta's settings onto RLlib's.
The names below are imported on first use, so ``bridges.rllib.settings`` (read by the CLI's
``--help``) does not import ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GridCNNModule": "bridges.rllib.grid_module",
    "LAYOUT_COLUMNS": "bridges.rllib.layout",
    "MettaColumns": "bridges.rllib.layout",
    "MettaLayoutConnector": "bridges.rllib.layout",
    "check_metta_batch": "bridges.rllib.layout",
    "MettaGridMultiAgentEnv": "bridges.rllib.mettagrid_env",
    "MettaPPOLearner": "bridges.rllib.learner",
    "MettaRecurrentModule": "bridges.rllib.recurrent",
    "MettaSelfSupervisedLoss": "bridges.rllib.loss",
    "metta_loss_terms": "bridges.rllib.loss",
    "metta_ppo_config": "bridges.rllib.config",
    "metta_settings": "bridges.rllib.config",
    "RLlibSettings": "bridges.rllib.settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bridges.rllib' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
