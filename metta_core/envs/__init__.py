"""Training environments by name: gymnasium ids and ``mettagrid:<preset>`` arenas.

``make_training_env(env_id, num_envs, seed)`` returns a ``metta_core.gym_env.TrainingEnvironment``:
``mettagrid:arena-8`` / ``mettagrid:arena-24`` build ``num_envs`` MettaGrid arenas with every agent
a row (``metta_core.envs.mettagrid``); any other id is a gymnasium env run ``num_envs`` times.
"""

from __future__ import annotations

from typing import Any

from metta_core.envs.mettagrid import PREFIX as METTAGRID_PREFIX
from metta_core.envs.mettagrid import PRESETS as METTAGRID_PRESETS
from metta_core.errors import MettaError


def is_mettagrid(env_id: str) -> bool:
    """Whether ``env_id`` names a MettaGrid preset (``mettagrid:<name>``)."""
    return env_id.startswith(METTAGRID_PREFIX)


def check_mettagrid_id(env_id: str, who: str = "env") -> None:
    """Raise ``MettaError`` unless ``env_id`` is a known ``mettagrid:<preset>`` (mettagrid not imported)."""
    if env_id.removeprefix(METTAGRID_PREFIX) not in METTAGRID_PRESETS:
        known = sorted(METTAGRID_PREFIX + name for name in METTAGRID_PRESETS)
        raise MettaError(f"{who} {env_id!r} is not a MettaGrid preset; use one of {known}")


def make_training_env(env_id: str, num_envs: int, seed: int) -> Any:
    """The training environment named ``env_id`` with ``num_envs`` copies, seeded with ``seed``."""
    if is_mettagrid(env_id):
        from metta_core.envs.mettagrid import MettaGridEnvironment, preset_config

        return MettaGridEnvironment(preset_config(env_id), num_envs, seed)
    from metta_core.gym_env import GymVectorEnvironment

    return GymVectorEnvironment(env_id, num_envs, seed)
