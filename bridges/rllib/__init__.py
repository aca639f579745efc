"""Metta's PPO on RLlib's new API stack: learner, layout connector, module loss mixin, config.

    from bridges.rllib import metta_ppo_config
    algo = metta_ppo_config("CartPole-v1", batch_size=4096, bptt_horizon=16).build_algo()

See bridges/rllib/README.md for the layout and the mapping of Metta's settings onto RLlib's.
"""

from bridges.rllib.config import metta_ppo_config, metta_settings
from bridges.rllib.layout import LAYOUT_COLUMNS, MettaColumns, MettaLayoutConnector, check_metta_batch
from bridges.rllib.learner import MettaPPOLearner
from bridges.rllib.loss import MettaSelfSupervisedLoss, metta_loss_terms

__all__ = [
    "LAYOUT_COLUMNS",
    "MettaColumns",
    "MettaLayoutConnector",
    "MettaPPOLearner",
    "MettaSelfSupervisedLoss",
    "check_metta_batch",
    "metta_loss_terms",
    "metta_ppo_config",
    "metta_settings",
]
