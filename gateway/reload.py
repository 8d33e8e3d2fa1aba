"""What a reload changed, said without values (policy values may hold secrets).

``Gateway.reload`` (SIGHUP, ``mailgate reload``) logs which keys differ
between the running policy and the new one: top-level keys by name, plugins
by ``plugins.NAME`` (added, removed or changed). Keys that only take effect
on a restart are named in a warning.
"""

from __future__ import annotations

from typing import Any

from mailgate.policy import Policy

RESTART_ONLY = ("listen", "workers", "pid_file")
"""Keys read once at start: a reload keeps the old value until the next restart."""


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
