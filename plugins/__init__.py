"""mailgate's built-in filter plugins, one module each.

``BUILTIN_PLUGINS`` lists them in their default order. A policy enables a
plugin by naming it under ``plugins:``; the policy's order is the run order.
``relay_access`` is not listed: the core always loads it, last.
"""

from __future__ import annotations

from typing import Any

BUILTIN_PLUGINS: tuple[type[Any], ...] = ()

__all__ = ["BUILTIN_PLUGINS"]
