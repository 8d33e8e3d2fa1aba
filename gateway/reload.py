"""Reloading a policy: read it off the event loop, and say what changed without values.

``Gateway.reload`` (SIGHUP, ``mailgate reload``) reads and validates the
file with :func:`load_off_loop`, in a worker thread, so the gateway keeps
serving while it does (the YAML limits of ``mailgate.yamlsource`` bound that
work too). It then logs which keys differ between the running policy and the
new one (values may hold secrets): top-level keys by name, plugins by
``plugins.NAME`` (added, removed or changed). Keys that only take effect on a
restart are named in a warning.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mailgate.policy import Policy
from mailgate.runtime import Runtime

RESTART_ONLY = ("listen", "workers", "pid_file")
"""Keys read once at start: a reload keeps the old value until the next restart."""


async def load_off_loop(path: str) -> Runtime:
    """Read, validate and build the policy at ``path`` in a worker thread.

    Raises what :meth:`Runtime.load` raises (``SourceError`` for a bad policy).
    """
    return await asyncio.to_thread(Runtime.load, path)


def changed_keys(old: Policy, new: Policy) -> list[str]:
    """The dotted keys whose values differ, e.g. ``["domains", "plugins.spf (added)"]``."""
    before: dict[str, Any] = old.model_dump()
    after: dict[str, Any] = new.model_dump()
    changed = [k for k in after if k != "plugins" and before.get(k) != after[k]]
    old_plugins, new_plugins = before["plugins"], after["plugins"]
    for name in new_plugins:
        if name not in old_plugins:
            changed.append(f"plugins.{name} (added)")
        elif old_plugins[name] != new_plugins[name]:
            changed.append(f"plugins.{name}")
    changed += [f"plugins.{name} (removed)" for name in old_plugins if name not in new_plugins]
    if list(old_plugins) != list(new_plugins) and set(old_plugins) == set(new_plugins):
        changed.append("plugins (order)")
    return changed


def restart_only(changed: list[str]) -> list[str]:
    """The changed keys that a reload cannot apply."""
    return [key for key in changed if key in RESTART_ONLY]
