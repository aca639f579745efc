"""The one exception type for misuse of metta_core (and the bridges built on it)."""

from __future__ import annotations


class MettaError(ValueError):
    """Bad input or settings: the message names the key, shape, dtype or setting,
    what was expected and how to fix it."""


def require_positive_ints(who: str, **values: object) -> None:
    """Raise ``MettaError`` naming the first of ``values`` that is not a positive ``int``."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MettaError(f"{who}: {name} must be a positive int, got {value!r}")
