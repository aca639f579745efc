"""Run settings only RLlib reads (where Ray runs, how many learners and env runners).

They live here, not in ``metta_core.run.TrainArgs`` (settings every framework shares), and this
module imports neither ray nor the rest of the bridge, so ``metta-bridges train --help`` lists
them (group "rllib settings") without starting Ray. ``bridges.cli`` turns each field into a flag
the way it does for ``TrainArgs`` (``num_learners`` -> ``--num-learners``).
"""

from __future__ import annotations

from dataclasses import dataclass

from metta_core.errors import MettaError
from metta_core.run import setting


@dataclass
class RLlibSettings:
    """How ``metta-bridges train --framework rllib`` runs on Ray (no PPO semantics here)."""

    address: str | None = setting(
        None,
        "Ray cluster to join: HOST:PORT, or auto (RAY_ADDRESS, else the cluster `ray start` left on this "
        "machine). Default: a private local Ray, whatever clusters exist on the machine.",
    )
    num_learners: int = setting(0, "Remote learners (0 = learn in the driver; 2+ = DDP over gloo on CPU).")
    num_env_runners: int = setting(0, "Remote env runners (0 = sample in the driver).")
    restart_failed_env_runners: bool = setting(
        True, "Restart an env runner that dies and keep training (RLlib's fault tolerance)."
    )

    def __post_init__(self) -> None:
        for name in ("num_learners", "num_env_runners"):
            if getattr(self, name) < 0:
                raise MettaError(f"RLlibSettings.{name} is {getattr(self, name)}; expected 0 or more")
        if self.address is not None and not self.address.strip():
            raise MettaError("RLlibSettings.address is empty; give HOST:PORT or auto, or leave it unset for a local Ray")
