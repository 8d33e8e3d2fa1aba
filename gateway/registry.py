"""Find, configure and register the plugins a policy names, in policy order.

A plugin is found, in this order, by:

1. ``module: "pkg.mod:Class"`` (or ``"pkg.mod"`` for a module of hook functions)
   in its policy section;
2. its name among the built-in plugins (``plugins.BUILTIN_PLUGINS``);
3. its name among installed entry points in the group ``mailgate.plugins``.

A plugin class may declare ``Config``, a :class:`PluginConfig` model; the keys
of its policy section (apart from the common ones in :class:`PluginSettings`)
are validated against it and the instance is built as ``Class(config)``.
Every policy gets its own ``pluggy.PluginManager``: there is no global one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import pluggy
from pydantic import Field, ValidationError

from mailgate import hookspecs
from mailgate.policy import Policy, StrictModel, validation_messages
from mailgate.units import Duration
from mailgate.yamlsource import Document, SourceError

ENTRY_POINT_GROUP = "mailgate.plugins"
STAGES = ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_data")
EVENTS = ("on_startup", "on_shutdown", "on_delivered", "on_disconnect")

Mode = Literal["enforce", "monitor", "off"]


class PluginConfig(StrictModel):
    """Base for a plugin's own config model: unknown keys are errors."""


class PluginSettings(StrictModel):
    """Keys every plugin section may have, whatever the plugin."""

    module: str | None = None
    """``pkg.mod:Class`` or ``pkg.mod``: load the plugin from there."""
    mode: Mode = "enforce"
    """``monitor`` evaluates and logs but never changes a reply; ``off`` does not load it."""
    timeout: Duration = 10.0
    """The longest one hook call may take; past it the client gets 451 4.3.0."""
    rule_modes: dict[str, Mode] = Field(default_factory=dict)
    """Per rule id: ``monitor`` or ``off`` for that rule only."""


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    """A configured plugin instance and its common settings."""

    name: str
    plugin: object
    settings: PluginSettings


@dataclass(frozen=True, slots=True)
class PluginSet:
    """The plugins of one policy, registered with their own plugin manager."""

    manager: pluggy.PluginManager
    plugins: dict[str, LoadedPlugin]

    def call_order(self, hook: str) -> list[str]:
        """The plugin names whose ``hook`` runs, in the order they run."""
        impls = reversed(getattr(self.manager.hook, hook).get_hookimpls())
        return [impl.plugin_name for impl in impls]


def builtin_plugins() -> dict[str, type[Any]]:
    """The built-in plugin classes by name."""
    from mailgate.plugins import BUILTIN_PLUGINS

    return {cls.name: cls for cls in BUILTIN_PLUGINS}


def _import_target(target: str) -> object:
    module_name, _, attr = target.partition(":")
    module: ModuleType = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _entry_point(name: str) -> object | None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            loaded: object = ep.load()
            return loaded
    return None


def _resolve(name: str, settings: PluginSettings) -> object:
    if settings.module:
        try:
            return _import_target(settings.module)
        except (ImportError, AttributeError) as exc:
            raise LookupError(f"cannot load {settings.module!r}: {exc}") from None
    builtins = builtin_plugins()
    if name in builtins:
        return builtins[name]
    found = _entry_point(name)
    if found is None:
        known = ", ".join(sorted(builtins))
        raise LookupError(
            f"unknown plugin {name!r}: not built in ({known}), no entry point in "
            f"{ENTRY_POINT_GROUP!r}, and no 'module:' given"
        )
    return found


def _instantiate(target: Any, raw: dict[str, Any]) -> object:
    """Build the plugin object; raise ValidationError or TypeError on bad config."""
    if not inspect.isclass(target):
        if raw:
            raise TypeError(f"takes no settings, got {', '.join(sorted(raw))}")
        return target
    cls: Any = target
    config_model = getattr(cls, "Config", None)
    if config_model is None:
        if raw:
            raise TypeError(f"takes no settings, got {', '.join(sorted(raw))}")
        return cls()
    return cls(config_model.model_validate(raw))


def build_plugins(policy: Policy, doc: Document) -> PluginSet:
    """Load, configure and register every plugin the policy names (plus the always-on ones).

    Raises :class:`SourceError` with every problem found, each with its position.
    """
    from mailgate.plugins.auth_results import AuthResults
    from mailgate.plugins.relay_access import RelayAccess

    manager = pluggy.PluginManager("mailgate")
    manager.add_hookspecs(hookspecs)
    errors: list[str] = []
    loaded: list[LoadedPlugin] = []
    common = set(PluginSettings.model_fields)
    for name, section in policy.plugins.items():
        prefix = ("plugins", name)
        section = section or {}
        try:
            settings = PluginSettings.model_validate(
                {k: v for k, v in section.items() if k in common}
            )
        except ValidationError as exc:
            errors.extend(validation_messages(doc, exc, prefix))
            continue
        if settings.mode == "off":
            continue
        try:
            target = _resolve(name, settings)
            plugin = _instantiate(target, {k: v for k, v in section.items() if k not in common})
        except LookupError as exc:
            errors.append(doc.error((*prefix, "module") if settings.module else prefix, str(exc)))
            continue
        except ValidationError as exc:
            errors.extend(validation_messages(doc, exc, prefix))
            continue
        except (TypeError, ValueError) as exc:
            errors.append(doc.error(prefix, str(exc)))
            continue
        loaded.append(LoadedPlugin(name, plugin, settings))
    loaded.append(LoadedPlugin(RelayAccess.name, RelayAccess(policy), PluginSettings()))
    loaded.append(LoadedPlugin(AuthResults.name, AuthResults(policy), PluginSettings()))
    if errors:
        raise SourceError(errors)
    # pluggy calls the last registered first: register in reverse to run in policy order.
    for item in reversed(loaded):
        try:
            manager.register(item.plugin, name=item.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            errors.append(doc.error(("plugins", item.name), f"invalid plugin: {exc}"))
    if not errors:
        try:
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            errors.append(doc.error(("plugins",), f"invalid plugin: {exc}"))
    if errors:
        raise SourceError(errors)
    return PluginSet(manager, {item.name: item for item in loaded})
