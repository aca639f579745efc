"""The one exception type for misuse of metta_core (and the bridges built on it)."""

from __future__ import annotations


class MettaError(ValueError):
    """Bad input or settings: the message names the key, shape, dtype or setting,
    what was expected and how to fix it."""
