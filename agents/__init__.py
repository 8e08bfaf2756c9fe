"""Agents and trainers built on :mod:`acktr_kfe`.

``from agents import ACKTR, KroneckerActorCriticPolicy`` as ``from stable_baselines3 import A2C``: the ACKTR
algorithm and the Kronecker-preconditioned SB3 policies (MLP, CNN and multi-input). They are imported on first use,
so the supervised benchmark mode (``agents.supervised``) does not load Stable-Baselines3.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ACKTR": "agents.acktr",
    "KroneckerActorCriticPolicy": "agents.policies",
    "KroneckerActorCriticCnnPolicy": "agents.policies",
    "KroneckerMultiInputActorCriticPolicy": "agents.policies",
    "ValueTargetScale": "agents.policies",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The public classes, imported lazily (PEP 562)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
