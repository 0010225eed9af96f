"""The base every objective subclasses.

The contract itself belongs to the engine (:mod:`vitkit.engine.protocol`): the loop defines
what it calls, and objectives build on that, so the engine never imports this package.
"""

from __future__ import annotations

from ..engine.protocol import Objective, StepContext

__all__ = ["Objective", "StepContext"]
